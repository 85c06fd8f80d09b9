//! Service states -> the dataplane wanted: every frontend with its backends. Pure.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
};

use crate::{
    controlplane::{ControlPlane, ResolvedPort, ServiceChange, ServiceState},
    model::{Protocol, ServicePort, SessionAffinity, TrafficPolicy},
};

/// Who a frontend entry serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Clients in the cluster (pods, the node), and outside clients where no
    /// [`Scope::External`] entry exists.
    Cluster,
    /// Clients outside the cluster under `externalTrafficPolicy: Local`.
    External,
}

/// An address, port and protocol that a Service answers on, and who it serves there. The
/// address of a nodePort is 0.0.0.0: every one of the node's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    pub scope: Scope,
}

impl Frontend {
    /// A frontend in the cluster scope.
    pub fn cluster(ip: Ipv4Addr, port: u16, protocol: Protocol) -> Self {
        Self {
            ip,
            port,
            protocol,
            scope: Scope::Cluster,
        }
    }
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ip.is_unspecified() {
            write!(f, "<node>")?;
        } else {
            write!(f, "{}", self.ip)?;
        }
        write!(f, ":{}/{}", self.port, self.protocol.as_str())?;
        if self.scope == Scope::External {
            write!(f, " (external clients)")?;
        }
        Ok(())
    }
}

/// A frontend's backends, each list sorted and without duplicates (so slot order is stable).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Backends {
    /// Take new flows.
    pub serving: Vec<SocketAddrV4>,
    /// Take no new flow; their tracked flows go on (not ready, or terminating).
    pub draining: Vec<SocketAddrV4>,
    /// `sessionAffinity: ClientIP`: the seconds a client keeps its backend after its last new
    /// flow.
    pub affinity_timeout_s: Option<u32>,
    /// `loadBalancerSourceRanges` at a LoadBalancer address: the only clients that may open
    /// flows (sorted, no duplicates; empty: every client).
    pub source_ranges: Vec<ipnet::Ipv4Net>,
}

/// How new flows pick among a frontend's serving backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Algorithm {
    /// Uniformly at random.
    #[default]
    Random,
    /// By the flow's entry in a Maglev table of this many entries (a prime).
    Maglev { table_size: u32 },
}

impl Backends {
    /// Backends that all take new flows.
    pub fn serving(mut serving: Vec<SocketAddrV4>) -> Self {
        serving.sort();
        serving.dedup();
        Self {
            serving,
            ..Self::default()
        }
    }
}

/// Every frontend with its backends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredDataplane {
    pub frontends: BTreeMap<Frontend, Backends>,
    pub algorithm: Algorithm,
}

impl DesiredDataplane {
    /// Every Service's frontends.
    pub fn from_states<'a>(states: impl IntoIterator<Item = &'a ServiceState>) -> Self {
        let mut desired = Self::default();
        for state in states {
            desired.frontends.extend(frontends_of(state));
        }
        desired
    }

    /// Replaces the frontends of the Services in `changes` with the ones they have now in
    /// `control`; returns every frontend added, changed or removed.
    pub fn update(
        &mut self,
        control: &ControlPlane,
        changes: &[ServiceChange],
    ) -> BTreeSet<Frontend> {
        let mut touched = BTreeSet::new();
        // All removals first: an address can pass from one Service to another in one change.
        for before in changes.iter().filter_map(|c| c.before.as_ref()) {
            for (frontend, _) in frontends_of(before) {
                self.frontends.remove(&frontend);
                touched.insert(frontend);
            }
        }
        for state in changes.iter().filter_map(|c| control.state(&c.name)) {
            for (frontend, backends) in frontends_of(state) {
                touched.insert(frontend);
                self.frontends.insert(frontend, backends);
            }
        }
        touched
    }
}

/// A Service's frontends: each with the index of the port it serves, whether only this node's
/// endpoints serve it (a Local traffic policy), and whether it is a LoadBalancer address.
fn frontends(state: &ServiceState) -> Vec<(Frontend, usize, bool, bool)> {
    let svc = &state.service;
    let mut out = Vec::new();
    if !svc.proxied {
        return out;
    }
    for (i, resolved) in state.ports.iter().enumerate() {
        let port = &resolved.port;
        let at = |ip, number, scope| Frontend {
            ip,
            port: number,
            protocol: port.protocol,
            scope,
        };
        if let Some(ip) = state.cluster_ip {
            let local = svc.internal_traffic_policy == TrafficPolicy::Local;
            out.push((at(ip, port.port, Scope::Cluster), i, local, false));
        }
        let node_port = state.external.node_ports.get(i).copied().flatten();
        let external = node_port
            .map(|n| (Ipv4Addr::UNSPECIFIED, n, false))
            .into_iter()
            .chain(
                (state
                    .external
                    .load_balancer_ips
                    .iter()
                    .map(|ip| (*ip, true)))
                .chain(svc.external_ips.iter().map(|ip| (*ip, false)))
                .map(|(ip, balancer)| (ip, port.port, balancer)),
            );
        // Clients in the cluster calling an external address are served as at the ClusterIP
        // by every endpoint; outside clients too unless the external policy is Local.
        for (ip, number, balancer) in external {
            out.push((at(ip, number, Scope::Cluster), i, false, balancer));
            if svc.external_traffic_policy == TrafficPolicy::Local {
                out.push((at(ip, number, Scope::External), i, true, balancer));
            }
        }
    }
    out
}

/// A Service's frontends, each with the port it serves.
pub fn frontend_ports(state: &ServiceState) -> impl Iterator<Item = (Frontend, &ServicePort)> {
    frontends(state)
        .into_iter()
        .map(|(frontend, i, _, _)| (frontend, &state.ports[i].port))
}

/// A Service's frontends, each with its backends in order.
fn frontends_of(state: &ServiceState) -> impl Iterator<Item = (Frontend, Backends)> + '_ {
    let affinity_timeout_s = match state.service.session_affinity {
        SessionAffinity::ClientIp { timeout_s } => Some(timeout_s),
        SessionAffinity::None => None,
    };
    let mut source_ranges = state.service.load_balancer_source_ranges.clone();
    source_ranges.sort();
    source_ranges.dedup();
    frontends(state)
        .into_iter()
        .map(move |(frontend, i, local, balancer)| {
            let port = &state.ports[i];
            let mut backends = if local {
                backends(&port.local(), affinity_timeout_s)
            } else {
                backends(port, affinity_timeout_s)
            };
            if balancer {
                backends.source_ranges = source_ranges.clone();
            }
            (frontend, backends)
        })
}

fn backends(port: &ResolvedPort, affinity_timeout_s: Option<u32>) -> Backends {
    let mut backends = Backends::serving(port.serving().to_vec());
    let mut draining: Vec<_> = port
        .draining()
        .filter(|a| !backends.serving.contains(a))
        .collect();
    draining.sort();
    draining.dedup();
    backends.draining = draining;
    backends.affinity_timeout_s = affinity_timeout_s;
    backends
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controlplane::states_from_yaml;

    #[test]
    fn one_frontend_per_cluster_ip_port_and_protocol() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: dns}\nspec:\n  clusterIP: 198.19.0.53\n  selector: {app: dns}\n  ports: [{name: tcp, port: 53}, {name: udp, port: 53, protocol: UDP}]\n---\n\
apiVersion: v1\nkind: Service\nmetadata: {name: headless}\nspec: {clusterIP: None, selector: {app: dns}, ports: [{port: 53}]}\n---\n\
apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {app: dns}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 198.18.1.9}\n";
        let states = states_from_yaml(yaml);
        let d = DesiredDataplane::from_states(&states);
        assert_eq!(d.frontends.len(), 2, "headless has no frontend");
        let ip: Ipv4Addr = "198.19.0.53".parse().unwrap();
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let b = &d.frontends[&Frontend::cluster(ip, 53, protocol)];
            assert_eq!(
                b.serving,
                vec!["198.18.1.9:53".parse::<SocketAddrV4>().unwrap()]
            );
        }
    }
}
