//! The part of the control plane that standalone mode does itself: ClusterIP allocation and
//! endpoints from selectors over Pods (or from manual Endpoints / EndpointSlices). Pure.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    time::SystemTime,
};

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::model::{
    ClusterIpRequest, FieldError, ManualEndpoints, Object, ObjectName, Pod, Service, ServicePort,
    ServiceType, TargetPort,
};

/// One service port with the endpoints that serve it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ResolvedPort {
    pub port: ServicePort,
    /// Ready endpoints: the only ones that get traffic.
    pub ready: Vec<SocketAddrV4>,
    pub not_ready: Vec<SocketAddrV4>,
}

/// A Service as the cluster would present it: with its address and its endpoints.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceState {
    pub service: Service,
    /// `None` for headless and ExternalName Services.
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<ResolvedPort>,
    #[serde(skip)]
    pub created: SystemTime,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceError {
    pub service: ObjectName,
    pub error: FieldError,
}

pub struct ControlPlane {
    cidr: Ipv4Net,
    /// Services accepted last time, with their address: kept while they exist, so an address
    /// never moves, and used in place of a newer version that cannot be accepted.
    accepted: HashMap<ObjectName, (Service, Option<Ipv4Addr>)>,
    first_seen: HashMap<ObjectName, SystemTime>,
}

impl ControlPlane {
    pub fn new(cidr: Ipv4Net) -> Self {
        Self {
            cidr,
            accepted: HashMap::new(),
            first_seen: HashMap::new(),
        }
    }

    pub fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    /// Computes every Service's state from the current objects.
    pub fn compute<'a>(
        &mut self,
        objects: impl IntoIterator<Item = &'a Object>,
        now: SystemTime,
    ) -> (Vec<ServiceState>, Vec<ServiceError>) {
        let mut services: BTreeMap<ObjectName, &Service> = BTreeMap::new();
        let mut pods: Vec<&Pod> = Vec::new();
        let mut manual: Vec<&ManualEndpoints> = Vec::new();
        for o in objects {
            match o {
                Object::Service(s) => {
                    services.insert(s.id.clone(), s);
                }
                Object::Pod(p) => pods.push(p),
                Object::Endpoints(e) | Object::EndpointSlice(e) => manual.push(e),
            }
        }
        let index = Index::new(&pods, &manual);
        self.accepted.retain(|name, _| services.contains_key(name));
        self.first_seen
            .retain(|name, _| services.contains_key(name));

        let (addresses, errors) = self.allocate(&services);
        let mut states = Vec::new();
        for (name, svc) in &services {
            let (svc, cluster_ip) = match addresses.get(name) {
                Some(ip) => ((*svc).clone(), *ip),
                // Rejected now but accepted before: the previous version stays in force.
                None => match self.accepted.get(name) {
                    Some((old, ip)) => (old.clone(), *ip),
                    None => continue,
                },
            };
            self.accepted
                .insert(name.clone(), (svc.clone(), cluster_ip));
            let created = svc
                .created
                .unwrap_or(*self.first_seen.entry(name.clone()).or_insert(now));
            let ports = resolve_ports(&svc, &index);
            states.push(ServiceState {
                service: svc,
                cluster_ip,
                ports,
                created,
            });
        }
        (states, errors)
    }

    /// Address of every Service that can be accepted (`None` inside: headless/ExternalName).
    fn allocate(
        &self,
        services: &BTreeMap<ObjectName, &Service>,
    ) -> (HashMap<ObjectName, Option<Ipv4Addr>>, Vec<ServiceError>) {
        let mut result = HashMap::new();
        let mut errors = Vec::new();
        let mut used: BTreeSet<Ipv4Addr> = BTreeSet::new();
        let wants_ip = |s: &Service| {
            s.service_type != ServiceType::ExternalName
                && s.cluster_ip != ClusterIpRequest::Headless
        };
        // 1. Services keep the address they have, if their spec still allows it.
        for (name, svc) in services {
            if !wants_ip(svc) {
                result.insert(name.clone(), None);
                continue;
            }
            if let Some((_, Some(ip))) = self.accepted.get(name) {
                // Reserved this round even if the spec moves away from it: a rejected update
                // falls back to the accepted version and its address.
                used.insert(*ip);
                let keeps = match svc.cluster_ip {
                    ClusterIpRequest::Allocate => true,
                    ClusterIpRequest::Fixed(want) => want == *ip,
                    ClusterIpRequest::Headless => false,
                };
                if keeps {
                    result.insert(name.clone(), Some(*ip));
                }
            }
        }
        // 2. Addresses chosen by the user.
        for (name, svc) in services {
            let ClusterIpRequest::Fixed(ip) = svc.cluster_ip else {
                continue;
            };
            if result.contains_key(name) || !wants_ip(svc) {
                continue;
            }
            let error = if !self.usable(ip) {
                Some(format!(
                    "Invalid value: \"{ip}\": provided IP is not in the valid range. The range of valid IPs is {}",
                    self.cidr
                ))
            } else if !used.insert(ip) {
                Some(format!(
                    "Invalid value: \"{ip}\": provided IP is already allocated"
                ))
            } else {
                None
            };
            match error {
                Some(message) => errors.push(ServiceError {
                    service: name.clone(),
                    error: FieldError {
                        field: "spec.clusterIP".into(),
                        message,
                    },
                }),
                None => {
                    result.insert(name.clone(), Some(ip));
                }
            }
        }
        // 3. Allocation: a slot derived from the name, so an agent restarted on the same
        //    manifests gives every Service the address it had.
        let size = 1u64 << (32 - self.cidr.prefix_len());
        for (name, svc) in services {
            if result.contains_key(name)
                || svc.cluster_ip != ClusterIpRequest::Allocate
                || !wants_ip(svc)
            {
                continue;
            }
            let start = fnv1a(format!("{}/{}", name.namespace, name.name).as_bytes()) % size;
            let base = u32::from(self.cidr.network()) as u64;
            let found = (0..size)
                .map(|i| Ipv4Addr::from((base + (start + i) % size) as u32))
                .find(|ip| self.usable(*ip) && !used.contains(ip));
            match found {
                Some(ip) => {
                    used.insert(ip);
                    result.insert(name.clone(), Some(ip));
                }
                None => errors.push(ServiceError {
                    service: name.clone(),
                    error: FieldError {
                        field: "spec.clusterIP".into(),
                        message: format!("Internal error: no address left in {}", self.cidr),
                    },
                }),
            }
        }
        (result, errors)
    }

    /// In the CIDR, and neither its network nor (for prefixes up to /30) broadcast address.
    fn usable(&self, ip: Ipv4Addr) -> bool {
        self.cidr.contains(&ip)
            && (self.cidr.prefix_len() >= 31
                || (ip != self.cidr.network() && ip != self.cidr.broadcast()))
    }
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Pods by label and manual endpoints by Service, so that resolving every Service does not
/// scan every object.
struct Index<'a> {
    pods_by_label: HashMap<(&'a str, &'a str, &'a str), Vec<&'a Pod>>,
    manual_by_service: HashMap<&'a ObjectName, Vec<&'a ManualEndpoints>>,
}

impl<'a> Index<'a> {
    fn new(pods: &[&'a Pod], manual: &[&'a ManualEndpoints]) -> Self {
        let mut pods_by_label: HashMap<_, Vec<&Pod>> = HashMap::new();
        for pod in pods {
            for (k, v) in &pod.labels {
                pods_by_label
                    .entry((pod.id.namespace.as_str(), k.as_str(), v.as_str()))
                    .or_default()
                    .push(*pod);
            }
        }
        let mut manual_by_service: HashMap<_, Vec<&ManualEndpoints>> = HashMap::new();
        for m in manual {
            manual_by_service.entry(&m.service).or_default().push(*m);
        }
        Self {
            pods_by_label,
            manual_by_service,
        }
    }

    /// Pods of `namespace` whose labels contain every pair of `selector`.
    fn selected<'s>(
        &'s self,
        namespace: &'s str,
        selector: &'s BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a Pod> + 's {
        let candidates = selector
            .iter()
            .next()
            .and_then(|(k, v)| self.pods_by_label.get(&(namespace, k.as_str(), v.as_str())));
        candidates
            .into_iter()
            .flatten()
            .copied()
            .filter(move |pod| selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v)))
    }

    fn manual(&self, service: &ObjectName) -> &[&'a ManualEndpoints] {
        self.manual_by_service
            .get(service)
            .map_or(&[], Vec::as_slice)
    }
}

fn resolve_ports(svc: &Service, index: &Index) -> Vec<ResolvedPort> {
    if svc.service_type == ServiceType::ExternalName {
        return Vec::new();
    }
    svc.ports
        .iter()
        .map(|port| {
            let mut ready = BTreeSet::new();
            let mut not_ready = BTreeSet::new();
            let mut add = |addr: SocketAddrV4, is_ready: bool| {
                if is_ready {
                    ready.insert(addr)
                } else {
                    not_ready.insert(addr)
                };
            };
            match &svc.selector {
                Some(selector) => {
                    for pod in index.selected(&svc.id.namespace, selector) {
                        let Some(ip) = pod.ip else { continue };
                        let target = match &port.target_port {
                            TargetPort::Number(n) => Some(*n),
                            TargetPort::Name(name) => pod
                                .named_ports
                                .iter()
                                .find(|np| &np.name == name && np.protocol == port.protocol)
                                .map(|np| np.port),
                        };
                        if let Some(target) = target {
                            add(SocketAddrV4::new(ip, target), pod.ready);
                        }
                    }
                }
                None => {
                    for m in index.manual(&svc.id) {
                        for group in &m.groups {
                            let Some(ep_port) = group
                                .ports
                                .iter()
                                .find(|p| p.name == port.name && p.protocol == port.protocol)
                            else {
                                continue;
                            };
                            for (ip, is_ready) in &group.addresses {
                                add(SocketAddrV4::new(*ip, ep_port.port), *is_ready);
                            }
                        }
                    }
                }
            }
            // An address both ready and not ready (two slices) counts as ready.
            let not_ready = not_ready.difference(&ready).copied().collect();
            ResolvedPort {
                port: port.clone(),
                ready: ready.into_iter().collect(),
                not_ready,
            }
        })
        .collect()
}

/// Service states of a YAML manifest, as a fresh control plane over 198.19.0.0/16 computes
/// them at the Unix epoch (for tests of the stages that follow).
#[cfg(test)]
pub fn states_from_yaml(yaml: &str) -> Vec<ServiceState> {
    let objects: Vec<Object> =
        crate::sources::manifests::parse_file(std::path::Path::new("t.yaml"), yaml)
            .expect("test manifest parses")
            .into_iter()
            .map(|r| r.expect("test object is valid"))
            .collect();
    let (states, errors) = ControlPlane::new("198.19.0.0/16".parse().expect("cidr"))
        .compute(&objects, SystemTime::UNIX_EPOCH);
    assert!(errors.is_empty(), "{errors:?}");
    states
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::manifests::parse_file;
    use std::path::Path;

    fn objects(yaml: &str) -> Vec<Object> {
        parse_file(Path::new("t.yaml"), yaml)
            .unwrap()
            .into_iter()
            .map(|r| r.unwrap())
            .collect()
    }

    fn cp() -> ControlPlane {
        ControlPlane::new("198.19.0.0/16".parse().unwrap())
    }

    fn svc(name: &str, extra: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  selector: {{app: {name}}}\n  ports: [{{port: 80, targetPort: 8080}}]\n{extra}---\n"
        )
    }

    fn pod(name: &str, app: &str, ip: &str, extra: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: {app}}}}}\nspec:\n  containers:\n  - name: c\n    ports: [{{name: web, containerPort: 9090}}]\nstatus:\n  podIP: {ip}\n{extra}---\n"
        )
    }

    #[test]
    fn allocation_is_stable_unique_and_inside_the_cidr() {
        let yaml: String = (0..50).map(|i| svc(&format!("s{i}"), "")).collect();
        let objs = objects(&yaml);
        let (a, errors) = cp().compute(&objs, SystemTime::UNIX_EPOCH);
        assert!(errors.is_empty());
        let ips: BTreeSet<_> = a.iter().map(|s| s.cluster_ip.unwrap()).collect();
        assert_eq!(ips.len(), 50);
        assert!(ips.iter().all(|ip| cp().usable(*ip)));
        // A fresh control plane (agent restart) hands out the same addresses.
        let (b, _) = cp().compute(&objs, SystemTime::UNIX_EPOCH);
        assert_eq!(a, b);
    }

    #[test]
    fn fixed_ip_outside_cidr_or_taken_is_rejected_with_the_service_named() {
        let yaml = svc("a", "  clusterIP: 198.19.0.10\n")
            + &svc("b", "  clusterIP: 198.19.0.10\n")
            + &svc("c", "  clusterIP: 10.0.0.1\n");
        let (states, errors) = cp().compute(&objects(&yaml), SystemTime::UNIX_EPOCH);
        assert_eq!(states.len(), 1);
        assert_eq!(states[0].cluster_ip, Some("198.19.0.10".parse().unwrap()));
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].service.name, "b");
        assert!(errors[0].error.message.contains("already allocated"));
        assert_eq!(errors[1].service.name, "c");
        assert!(errors[1].error.message.contains("not in the valid range"));
    }

    #[test]
    fn a_running_service_keeps_its_address_against_a_newcomer() {
        let mut cp = cp();
        let (first, _) = cp.compute(&objects(&svc("old", "")), SystemTime::UNIX_EPOCH);
        let ip = first[0].cluster_ip.unwrap();
        let yaml = svc("old", "") + &svc("new", &format!("  clusterIP: {ip}\n"));
        let (states, errors) = cp.compute(&objects(&yaml), SystemTime::UNIX_EPOCH);
        assert_eq!(
            states
                .iter()
                .find(|s| s.service.id.name == "old")
                .unwrap()
                .cluster_ip,
            Some(ip)
        );
        assert_eq!(errors[0].service.name, "new");
    }

    #[test]
    fn rejected_update_keeps_the_accepted_version() {
        let mut cp = cp();
        cp.compute(
            &objects(&svc("a", "  clusterIP: 198.19.0.10\n")),
            SystemTime::UNIX_EPOCH,
        );
        let (states, errors) = cp.compute(
            &objects(&svc("a", "  clusterIP: 10.1.1.1\n")),
            SystemTime::UNIX_EPOCH,
        );
        assert_eq!(errors.len(), 1);
        assert_eq!(states[0].cluster_ip, Some("198.19.0.10".parse().unwrap()));
    }

    #[test]
    fn headless_and_external_name_get_no_address() {
        let yaml = svc("h", "  clusterIP: None\n")
            + "apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {type: ExternalName, externalName: db.example.com}\n";
        let (states, errors) = cp().compute(&objects(&yaml), SystemTime::UNIX_EPOCH);
        assert!(errors.is_empty());
        assert!(states.iter().all(|s| s.cluster_ip.is_none()));
    }

    #[test]
    fn selector_readiness_namespace_and_named_ports() {
        let mut yaml = svc("web", "");
        yaml += &pod("p1", "web", "198.18.1.2", "");
        yaml += &pod(
            "p2",
            "web",
            "198.18.1.3",
            "  conditions: [{type: Ready, status: \"False\"}]\n",
        );
        yaml += &pod("p3", "other", "198.18.1.4", "");
        yaml += "apiVersion: v1\nkind: Pod\nmetadata: {name: p4, namespace: elsewhere, labels: {app: web}}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 198.18.1.5}\n---\n";
        yaml += "apiVersion: v1\nkind: Service\nmetadata: {name: named}\nspec:\n  selector: {app: web}\n  ports: [{port: 80, targetPort: web}]\n---\n";
        yaml += "apiVersion: v1\nkind: Pod\nmetadata: {name: p5, labels: {app: web}}\nspec:\n  containers:\n  - name: c\n    ports: [{name: web, containerPort: 7070}]\nstatus: {podIP: 198.18.1.6}\n";
        let (states, _) = cp().compute(&objects(&yaml), SystemTime::UNIX_EPOCH);
        let web = states.iter().find(|s| s.service.id.name == "web").unwrap();
        let addrs = |v: &[SocketAddrV4]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        assert_eq!(
            addrs(&web.ports[0].ready),
            ["198.18.1.2:8080", "198.18.1.6:8080"]
        );
        assert_eq!(addrs(&web.ports[0].not_ready), ["198.18.1.3:8080"]);
        let named = states
            .iter()
            .find(|s| s.service.id.name == "named")
            .unwrap();
        assert_eq!(
            addrs(&named.ports[0].ready),
            ["198.18.1.2:9090", "198.18.1.6:7070"]
        );
    }

    #[test]
    fn selectorless_service_uses_endpoints_and_slices_by_port_name() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec:\n  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]\n---\n\
apiVersion: v1\nkind: Endpoints\nmetadata: {name: ext}\nsubsets:\n- addresses: [{ip: 198.18.9.1}]\n  ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: ext-1, labels: {kubernetes.io/service-name: ext}}\naddressType: IPv4\nendpoints: [{addresses: [198.18.9.2]}]\nports: [{name: http, port: 8081}]\n";
        let (states, _) = cp().compute(&objects(yaml), SystemTime::UNIX_EPOCH);
        let p = &states[0].ports;
        assert_eq!(
            p[0].ready.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            ["198.18.9.1:8080", "198.18.9.2:8081"]
        );
        assert_eq!(
            p[1].ready.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            ["198.18.9.1:5353"]
        );
    }
}
