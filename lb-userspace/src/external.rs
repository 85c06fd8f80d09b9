//! What a Service answers on outside the cluster: its nodePorts, health check nodePort and
//! LoadBalancer addresses. Standalone mode allocates the missing ones, deterministically from
//! the Service's name so that every node's agent picks the same from the same manifests; in
//! cluster mode the API server and the cloud have set them and they are taken as given. Pure.
use std::{collections::HashMap, net::Ipv4Addr, ops::RangeInclusive};

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::model::{FieldError, ObjectName, Service, ServiceType, TrafficPolicy};

/// Kubernetes' default `--service-node-port-range`.
pub const DEFAULT_NODE_PORT_RANGE: RangeInclusive<u16> = 30000..=32767;

/// What this agent allocates itself (standalone mode); `None`: only what the objects say.
#[derive(Clone, Debug, Default)]
pub struct AllocationRanges {
    pub node_ports: Option<RangeInclusive<u16>>,
    pub load_balancer_cidr: Option<Ipv4Net>,
}

/// A Service's external reach, as accepted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct External {
    /// One per Service port, in order (`None` where the Service type has no nodePorts).
    pub node_ports: Vec<Option<u16>>,
    pub health_check_node_port: Option<u16>,
    /// The LoadBalancer addresses that answer on the Service's ports (`ipMode: Proxy` ones
    /// left out: the load balancer delivers their traffic to the nodes' addresses).
    pub load_balancer_ips: Vec<Ipv4Addr>,
}

impl External {
    fn node_port_numbers(&self) -> impl Iterator<Item = u16> + '_ {
        self.node_ports
            .iter()
            .flatten()
            .chain(&self.health_check_node_port)
            .copied()
    }
}

/// Which Service holds each nodePort and allocated LoadBalancer address.
#[derive(Debug, Default)]
pub struct Allocator {
    ranges: AllocationRanges,
    node_ports: HashMap<u16, ObjectName>,
    load_balancer_ips: HashMap<Ipv4Addr, ObjectName>,
}

fn error(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Allocator {
    pub fn new(ranges: AllocationRanges) -> Self {
        Self {
            ranges,
            ..Self::default()
        }
    }

    /// Reserves what `svc` needs: the nodePorts and addresses it asks for, those it held
    /// (`held`: its accepted state's), new ones for the rest. On error nothing new stays
    /// reserved.
    pub fn assign(
        &mut self,
        svc: &Service,
        held: Option<&External>,
    ) -> Result<External, FieldError> {
        let mut taken = Vec::new();
        let result = self.try_assign(svc, held, &mut taken);
        if result.is_err() {
            for port in taken {
                self.node_ports.remove(&port);
            }
        }
        result
    }

    fn try_assign(
        &mut self,
        svc: &Service,
        held: Option<&External>,
        taken: &mut Vec<u16>,
    ) -> Result<External, FieldError> {
        let name = &svc.id;
        let mut external = External::default();
        for (i, port) in svc.ports.iter().enumerate() {
            if !svc.has_node_ports() {
                external.node_ports.push(None);
                continue;
            }
            let kept = held
                .and_then(|h| h.node_ports.get(i).copied().flatten())
                .filter(|p| self.node_ports.get(p) == Some(name));
            let field = format!("spec.ports[{i}].nodePort");
            // The same number may serve another protocol of the same Service.
            let shared = port.node_port.is_none().then(|| {
                svc.ports[..i]
                    .iter()
                    .zip(&external.node_ports)
                    .find(|(q, _)| q.port == port.port && q.protocol != port.protocol)
                    .and_then(|(_, n)| *n)
            });
            let chosen = match (port.node_port, kept, shared.flatten()) {
                (Some(given), _, _) => self.reserve(name, given, &field, taken)?,
                (None, Some(kept), _) => kept,
                (None, None, Some(shared)) => shared,
                (None, None, None) => self.allocate(name, &format!("{i}"), &field, taken)?,
            };
            external.node_ports.push(Some(chosen));
        }
        let wants_health_check = svc.service_type == ServiceType::LoadBalancer
            && svc.external_traffic_policy == TrafficPolicy::Local;
        if wants_health_check {
            const FIELD: &str = "spec.healthCheckNodePort";
            let kept = held
                .and_then(|h| h.health_check_node_port)
                .filter(|p| self.node_ports.get(p) == Some(name));
            external.health_check_node_port = Some(match (svc.health_check_node_port, kept) {
                (Some(given), _) => self.reserve(name, given, FIELD, taken)?,
                (None, Some(kept)) => kept,
                (None, None) => self.allocate(name, "health", FIELD, taken)?,
            });
        }
        external.load_balancer_ips = self.load_balancer_ips(svc, held)?;
        Ok(external)
    }

    /// A nodePort the Service asks for: in the range (standalone) and held by no other.
    fn reserve(
        &mut self,
        name: &ObjectName,
        port: u16,
        field: &str,
        taken: &mut Vec<u16>,
    ) -> Result<u16, FieldError> {
        if let Some(range) = &self.ranges.node_ports
            && !range.contains(&port)
        {
            return Err(error(
                field,
                format!(
                    "Invalid value: {port}: provided port is not in the valid range. The range of valid ports is {}-{}",
                    range.start(),
                    range.end()
                ),
            ));
        }
        match self.node_ports.get(&port) {
            Some(owner) if owner != name => Err(error(
                field,
                format!(
                    "Invalid value: {port}: provided port is already allocated (to Service {owner})"
                ),
            )),
            Some(_) => Ok(port),
            None => {
                self.node_ports.insert(port, name.clone());
                taken.push(port);
                Ok(port)
            }
        }
    }

    /// A free nodePort, from a slot derived from the Service's name and `what` (the port).
    fn allocate(
        &mut self,
        name: &ObjectName,
        what: &str,
        field: &str,
        taken: &mut Vec<u16>,
    ) -> Result<u16, FieldError> {
        let Some(range) = self.ranges.node_ports.clone() else {
            return Err(error(
                field,
                "Required value: not allocated yet (the API server allocates nodePorts)",
            ));
        };
        let size = u64::from(range.end() - range.start()) + 1;
        let start = fnv1a(format!("{name}/{what}").as_bytes()) % size;
        let found = (0..size)
            .map(|i| range.start() + ((start + i) % size) as u16)
            .find(|p| !self.node_ports.contains_key(p));
        match found {
            Some(port) => {
                self.node_ports.insert(port, name.clone());
                taken.push(port);
                Ok(port)
            }
            None => Err(error(
                field,
                format!(
                    "Internal error: no nodePort left in {}-{}",
                    range.start(),
                    range.end()
                ),
            )),
        }
    }

    /// The status's addresses; where none (standalone: no cloud writes it) for a LoadBalancer
    /// Service, `spec.loadBalancerIP` or one allocated from the LoadBalancer CIDR.
    fn load_balancer_ips(
        &mut self,
        svc: &Service,
        held: Option<&External>,
    ) -> Result<Vec<Ipv4Addr>, FieldError> {
        if svc.service_type != ServiceType::LoadBalancer {
            return Ok(Vec::new());
        }
        if !svc.load_balancer_ingress.is_empty() {
            return Ok(svc
                .load_balancer_ingress
                .iter()
                .filter(|i| !i.proxy)
                .map(|i| i.ip)
                .collect());
        }
        let Some(cidr) = self.ranges.load_balancer_cidr else {
            return Ok(Vec::new());
        };
        if let Some(ip) = svc.load_balancer_ip {
            return Ok(vec![ip]);
        }
        let name = &svc.id;
        if let Some(ip) = held
            .and_then(|h| h.load_balancer_ips.first())
            .filter(|ip| self.load_balancer_ips.get(ip) == Some(name))
        {
            return Ok(vec![*ip]);
        }
        let hosts: Vec<Ipv4Addr> = cidr.hosts().collect();
        let size = hosts.len() as u64;
        let start = fnv1a(name.to_string().as_bytes()) % size.max(1);
        let found = (0..size)
            .map(|i| hosts[((start + i) % size) as usize])
            .find(|ip| !self.load_balancer_ips.contains_key(ip));
        match found {
            Some(ip) => {
                self.load_balancer_ips.insert(ip, name.clone());
                Ok(vec![ip])
            }
            None => Err(error(
                "status.loadBalancer.ingress",
                format!("Internal error: no address left in the LoadBalancer CIDR {cidr}"),
            )),
        }
    }

    /// Gives back what `old` held and `new` does not.
    pub fn release(&mut self, name: &ObjectName, old: &External, new: Option<&External>) {
        for port in old.node_port_numbers() {
            let kept = new.is_some_and(|n| n.node_port_numbers().any(|p| p == port));
            if !kept && self.node_ports.get(&port) == Some(name) {
                self.node_ports.remove(&port);
            }
        }
        for ip in &old.load_balancer_ips {
            let kept = new.is_some_and(|n| n.load_balancer_ips.contains(ip));
            if !kept && self.load_balancer_ips.get(ip) == Some(name) {
                self.load_balancer_ips.remove(ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model;

    fn svc(yaml: &str) -> Service {
        model::service(&serde_yaml::from_str(yaml).unwrap()).unwrap()
    }

    fn standalone() -> Allocator {
        Allocator::new(AllocationRanges {
            node_ports: Some(DEFAULT_NODE_PORT_RANGE),
            load_balancer_cidr: Some("198.18.200.0/24".parse().unwrap()),
        })
    }

    const WEB: &str = "metadata: {name: web}\nspec:\n  type: NodePort\n  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]\n";

    #[test]
    fn node_ports_are_allocated_from_the_name_the_same_on_every_node() {
        let web = svc(WEB);
        let first = standalone().assign(&web, None).unwrap();
        let second = standalone().assign(&web, None).unwrap();
        assert_eq!(first, second, "two agents, the same manifests");
        assert_eq!(first.node_ports.len(), 2);
        for port in first.node_ports.iter().flatten() {
            assert!(DEFAULT_NODE_PORT_RANGE.contains(port));
        }
        assert_ne!(first.node_ports[0], first.node_ports[1]);
        assert_eq!(first.health_check_node_port, None);
        assert!(first.load_balancer_ips.is_empty());
    }

    #[test]
    fn a_given_node_port_is_kept_and_a_clash_names_the_holder() {
        let mut a = standalone();
        let one = svc(
            "metadata: {name: one}\nspec:\n  type: NodePort\n  ports: [{port: 80, nodePort: 30080}]\n",
        );
        assert_eq!(a.assign(&one, None).unwrap().node_ports, [Some(30080)]);
        let two = svc(
            "metadata: {name: two}\nspec:\n  type: NodePort\n  ports: [{port: 81, nodePort: 30080}]\n",
        );
        let err = a.assign(&two, None).unwrap_err();
        assert_eq!(err.field, "spec.ports[0].nodePort");
        assert!(err.message.contains("already allocated"), "{err}");
        assert!(err.message.contains("default/one"), "{err}");
        let outside = svc(
            "metadata: {name: three}\nspec:\n  type: NodePort\n  ports: [{port: 81, nodePort: 8080}]\n",
        );
        let err = a.assign(&outside, None).unwrap_err();
        assert!(err.message.contains("30000-32767"), "{err}");
        // Released, the port can be taken.
        let held = a.assign(&one, None).unwrap();
        a.release(&one.id, &held, None);
        assert_eq!(a.assign(&two, None).unwrap().node_ports, [Some(30080)]);
    }

    #[test]
    fn a_service_keeps_its_ports_and_a_failed_assignment_takes_nothing() {
        let mut a = standalone();
        let web = svc(WEB);
        let held = a.assign(&web, None).unwrap();
        assert_eq!(a.assign(&web, Some(&held)).unwrap(), held);
        let taken = held.node_ports[0].unwrap();
        let clash = svc(&format!(
            "metadata: {{name: clash}}\nspec:\n  type: NodePort\n  ports: [{{name: a, port: 1}}, {{name: b, port: 2, nodePort: {taken}}}]\n"
        ));
        let before = a.node_ports.len();
        assert!(a.assign(&clash, None).is_err());
        assert_eq!(
            a.node_ports.len(),
            before,
            "the first port's allocation was given back"
        );
    }

    #[test]
    fn load_balancers_get_the_status_address_the_asked_one_or_an_allocated_one() {
        let mut a = standalone();
        let status = svc(
            "metadata: {name: lb1}\nspec:\n  type: LoadBalancer\n  ports: [{port: 80}]\nstatus:\n  loadBalancer:\n    ingress: [{ip: 203.0.113.7}, {ip: 203.0.113.8, ipMode: Proxy}]\n",
        );
        let e = a.assign(&status, None).unwrap();
        assert_eq!(
            e.load_balancer_ips,
            ["203.0.113.7".parse::<Ipv4Addr>().unwrap()]
        );
        assert!(e.node_ports[0].is_some());
        let asked = svc(
            "metadata: {name: lb2}\nspec:\n  type: LoadBalancer\n  loadBalancerIP: 198.18.200.50\n  ports: [{port: 80}]\n",
        );
        assert_eq!(
            a.assign(&asked, None).unwrap().load_balancer_ips,
            ["198.18.200.50".parse::<Ipv4Addr>().unwrap()]
        );
        let assigned = svc(
            "metadata: {name: lb3}\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  ports: [{port: 80}]\n",
        );
        let e = a.assign(&assigned, None).unwrap();
        let cidr: Ipv4Net = "198.18.200.0/24".parse().unwrap();
        assert!(cidr.contains(&e.load_balancer_ips[0]));
        assert!(
            e.health_check_node_port.is_some(),
            "Local: a health check port"
        );
        assert_eq!(standalone().assign(&assigned, None).unwrap(), e);
        // Cluster mode: nothing allocated.
        let mut cluster = Allocator::new(AllocationRanges::default());
        let given = svc(
            "metadata: {name: lb4}\nspec:\n  type: LoadBalancer\n  healthCheckNodePort: 31000\n  externalTrafficPolicy: Local\n  ports: [{port: 80, nodePort: 31001}]\n",
        );
        let e = cluster.assign(&given, None).unwrap();
        assert_eq!(e.node_ports, [Some(31001)]);
        assert_eq!(e.health_check_node_port, Some(31000));
        assert!(e.load_balancer_ips.is_empty());
    }
}
