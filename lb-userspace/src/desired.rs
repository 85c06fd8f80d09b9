//! Service states -> the dataplane wanted: every frontend with its ready backends. Pure.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
};

use crate::{controlplane::ServiceState, model::Protocol};

/// An address, port and protocol that a Service answers on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl std::fmt::Display for Frontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol.as_str())
    }
}

/// Every frontend with its backends, sorted (so slot order is stable).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredDataplane {
    pub frontends: BTreeMap<Frontend, Vec<SocketAddrV4>>,
}

pub fn desired(services: &[ServiceState]) -> DesiredDataplane {
    let mut frontends = BTreeMap::new();
    for state in services {
        let Some(ip) = state.cluster_ip else { continue };
        for p in &state.ports {
            let frontend = Frontend {
                ip,
                port: p.port.port,
                protocol: p.port.protocol,
            };
            let mut backends = p.ready.clone();
            backends.sort();
            backends.dedup();
            frontends.insert(frontend, backends);
        }
    }
    DesiredDataplane { frontends }
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
        let d = desired(&states);
        assert_eq!(d.frontends.len(), 2, "headless has no frontend");
        let ip: Ipv4Addr = "198.19.0.53".parse().unwrap();
        for protocol in [Protocol::Tcp, Protocol::Udp] {
            let b = &d.frontends[&Frontend {
                ip,
                port: 53,
                protocol,
            }];
            assert_eq!(b, &vec!["198.18.1.9:53".parse::<SocketAddrV4>().unwrap()]);
        }
    }
}
