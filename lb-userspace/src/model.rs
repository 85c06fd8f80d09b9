//! Kubernetes objects (k8s-openapi types) -> validated domain types. Pure.
//!
//! Every validation error names the field it is about, with the same paths kubectl uses
//! (`spec.ports[1].targetPort`).
use std::{collections::BTreeMap, fmt, net::Ipv4Addr, time::SystemTime};

use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};
use lb_common::affinity;
use serde::Serialize;

/// Namespace and name of an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ObjectName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => lb_common::PROTO_TCP,
            Protocol::Udp => lb_common::PROTO_UDP,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: TargetPort,
    pub node_port: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
    ExternalName,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceType::ClusterIP => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
            ServiceType::ExternalName => "ExternalName",
        }
    }
}

/// What `spec.clusterIP` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ClusterIpRequest {
    /// Empty: allocate one.
    Allocate,
    /// `None`: a headless Service.
    Headless,
    Fixed(Ipv4Addr),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum SessionAffinity {
    None,
    /// New connections from a client go to the endpoint its earlier ones went to, until it
    /// has opened none for this many seconds.
    ClientIp {
        timeout_s: u32,
    },
}

/// `externalTrafficPolicy` / `internalTrafficPolicy`: which endpoints a node sends traffic to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum TrafficPolicy {
    /// Every endpoint in the cluster.
    #[default]
    Cluster,
    /// Only the endpoints on the node the traffic arrived at (the client's address is kept).
    Local,
}

/// An address in `status.loadBalancer.ingress`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct LoadBalancerIngress {
    pub ip: Ipv4Addr,
    /// `ipMode: Proxy`: the load balancer proxies the traffic (it arrives addressed to the
    /// node), so pods calling this address must go out to it too, not be served in the node.
    pub proxy: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Service {
    pub id: ObjectName,
    pub service_type: ServiceType,
    pub cluster_ip: ClusterIpRequest,
    pub external_ips: Vec<Ipv4Addr>,
    pub external_name: Option<String>,
    /// `None` for a Service without selector (endpoints come from Endpoints/EndpointSlices).
    pub selector: Option<BTreeMap<String, String>>,
    pub ports: Vec<ServicePort>,
    pub session_affinity: SessionAffinity,
    /// `spec.publishNotReadyAddresses`: every endpoint counts as ready.
    pub publish_not_ready_addresses: bool,
    /// For clients outside the cluster at a nodePort, LoadBalancer IP or externalIP.
    pub external_traffic_policy: TrafficPolicy,
    /// For clients in the cluster at the ClusterIP.
    pub internal_traffic_policy: TrafficPolicy,
    /// `spec.loadBalancerIP`: the address asked for (standalone mode assigns it).
    pub load_balancer_ip: Option<Ipv4Addr>,
    /// `status.loadBalancer.ingress[].ip`: the addresses a load balancer answers on.
    pub load_balancer_ingress: Vec<LoadBalancerIngress>,
    /// `spec.loadBalancerSourceRanges`: the clients allowed at the LoadBalancer addresses
    /// (empty: all).
    pub load_balancer_source_ranges: Vec<ipnet::Ipv4Net>,
    /// `spec.healthCheckNodePort`: where a LoadBalancer Service with the Local external
    /// policy tells the load balancer whether this node has endpoints.
    pub health_check_node_port: Option<u16>,
    #[serde(skip)]
    pub created: Option<SystemTime>,
    /// Whether this proxy serves it. In cluster mode, Services labelled for another proxy or
    /// as headless are skipped as kube-proxy skips them (no datapath entries, not listed by
    /// `lb get`); cluster DNS still names them, as CoreDNS does.
    pub proxied: bool,
}

impl Service {
    /// Whether clients outside the cluster reach it at nodePorts.
    pub fn has_node_ports(&self) -> bool {
        matches!(
            self.service_type,
            ServiceType::NodePort | ServiceType::LoadBalancer
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NamedPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// An endpoint's conditions, as an EndpointSlice states them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointConditions {
    /// Takes new connections.
    pub ready: bool,
    /// Able to serve, whether terminating or not (ready, but for terminating).
    pub serving: bool,
    /// Being deleted.
    pub terminating: bool,
}

impl EndpointConditions {
    pub const READY: Self = Self {
        ready: true,
        serving: true,
        terminating: false,
    };
    pub const NOT_READY: Self = Self {
        ready: false,
        serving: false,
        terminating: false,
    };
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Pod {
    pub id: ObjectName,
    pub labels: BTreeMap<String, String>,
    pub ip: Option<Ipv4Addr>,
    /// Serving unless a `Ready` condition says `False`; terminating once being deleted.
    pub conditions: EndpointConditions,
    pub named_ports: Vec<NamedPort>,
    /// `spec.nodeName`: the node it runs on.
    pub node_name: Option<String>,
    /// `spec.hostname` and `spec.subdomain`: a headless Service named as the subdomain gives
    /// the Pod the DNS name `<hostname>.<subdomain>.<namespace>.svc.<domain>`.
    pub hostname: Option<String>,
    pub subdomain: Option<String>,
}

/// One port of a manually given endpoint set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointPort {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
}

/// Addresses that all serve the same ports (an Endpoints subset, or an EndpointSlice).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct EndpointGroup {
    pub ports: Vec<EndpointPort>,
    pub addresses: Vec<(Ipv4Addr, EndpointConditions)>,
    /// Topology hints: the zones each address is meant for (`hints.forZones`), for the
    /// addresses that have any.
    pub zone_hints: BTreeMap<Ipv4Addr, Vec<String>>,
    /// The node each address is on (`nodeName`), for the addresses that say.
    pub nodes: BTreeMap<Ipv4Addr, String>,
    /// The DNS hostname of each address (`hostname`), for the addresses that have one.
    pub hostnames: BTreeMap<Ipv4Addr, String>,
}

/// A hand-written Endpoints object or EndpointSlice for a Service without selector.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ManualEndpoints {
    pub id: ObjectName,
    pub service: ObjectName,
    pub groups: Vec<EndpointGroup>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub enum Object {
    Service(Service),
    Pod(Pod),
    Endpoints(ManualEndpoints),
    EndpointSlice(ManualEndpoints),
}

/// What identifies an object in a folder or a watch: its kind, namespace and name.
pub type ObjectKey = (&'static str, ObjectName);

impl Object {
    pub fn key(&self) -> ObjectKey {
        (self.kind(), self.id().clone())
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Object::Service(_) => "Service",
            Object::Pod(_) => "Pod",
            Object::Endpoints(_) => "Endpoints",
            Object::EndpointSlice(_) => "EndpointSlice",
        }
    }

    pub fn id(&self) -> &ObjectName {
        match self {
            Object::Service(s) => &s.id,
            Object::Pod(p) => &p.id,
            Object::Endpoints(e) | Object::EndpointSlice(e) => &e.id,
        }
    }
}

/// A field that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// Where a checked value sits in its object: a fixed path, or one built only when an error
/// names it (a slice of 100,000 endpoints would otherwise format a path for each).
trait FieldPath {
    fn path(self) -> String;
}

impl FieldPath for &str {
    fn path(self) -> String {
        self.to_string()
    }
}

impl<F: FnOnce() -> String> FieldPath for F {
    fn path(self) -> String {
        self()
    }
}

fn field_error(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

const DEFAULT_NAMESPACE: &str = "default";

fn object_name(meta: &ObjectMeta) -> Result<ObjectName, FieldError> {
    let name = meta.name.clone().unwrap_or_default();
    if name.is_empty() {
        return Err(field_error("metadata.name", "Required value"));
    }
    let namespace = meta
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
    Ok(ObjectName { namespace, name })
}

fn created(meta: &ObjectMeta) -> Option<SystemTime> {
    meta.creation_timestamp.as_ref().map(|t| {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.0.as_second().max(0) as u64)
    })
}

fn protocol(value: Option<&str>, field: impl FieldPath) -> Result<Protocol, FieldError> {
    match value.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Err(field_error(
            field.path(),
            "Unsupported value: \"SCTP\": not supported by this load balancer",
        )),
        other => Err(field_error(
            field.path(),
            format!("Unsupported value: {other:?}: supported values: \"TCP\", \"UDP\""),
        )),
    }
}

fn port_number(value: i32, field: impl FieldPath) -> Result<u16, FieldError> {
    if (1..=65535).contains(&value) {
        Ok(value as u16)
    } else {
        Err(field_error(
            field.path(),
            format!("Invalid value: {value}: must be between 1 and 65535, inclusive"),
        ))
    }
}

fn ipv4(value: &str, field: impl FieldPath) -> Result<Ipv4Addr, FieldError> {
    value.parse().map_err(|_| {
        field_error(
            field.path(),
            format!("Invalid value: {value:?}: must be a valid IPv4 address"),
        )
    })
}

/// IANA service name rules, as Kubernetes applies them to named ports.
fn valid_port_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.bytes().any(|b| b.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
}

pub fn service(svc: &core::Service) -> Result<Service, FieldError> {
    let id = object_name(&svc.metadata)?;
    let spec = svc.spec.clone().unwrap_or_default();
    let service_type = match spec.type_.as_deref().unwrap_or("ClusterIP") {
        "ClusterIP" => ServiceType::ClusterIP,
        "NodePort" => ServiceType::NodePort,
        "LoadBalancer" => ServiceType::LoadBalancer,
        "ExternalName" => ServiceType::ExternalName,
        other => {
            return Err(field_error(
                "spec.type",
                format!(
                    "Unsupported value: {other:?}: supported values: \"ClusterIP\", \"ExternalName\", \"LoadBalancer\", \"NodePort\""
                ),
            ));
        }
    };
    let cluster_ip = match spec.cluster_ip.as_deref().unwrap_or("") {
        "" => ClusterIpRequest::Allocate,
        "None" => ClusterIpRequest::Headless,
        ip => ClusterIpRequest::Fixed(ipv4(ip, "spec.clusterIP")?),
    };
    let external_name = spec.external_name.clone().filter(|n| !n.is_empty());
    if service_type == ServiceType::ExternalName && external_name.is_none() {
        return Err(field_error("spec.externalName", "Required value"));
    }
    let external_ips: Vec<Ipv4Addr> = spec
        .external_ips
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, ip)| ipv4(ip, || format!("spec.externalIPs[{i}]")))
        .collect::<Result<_, _>>()?;
    let session_affinity = match spec.session_affinity.as_deref().unwrap_or("None") {
        "None" => SessionAffinity::None,
        "ClientIP" => SessionAffinity::ClientIp {
            timeout_s: affinity_timeout(&spec)?,
        },
        other => {
            return Err(field_error(
                "spec.sessionAffinity",
                format!("Unsupported value: {other:?}: supported values: \"ClientIP\", \"None\""),
            ));
        }
    };

    let raw_ports = spec.ports.clone().unwrap_or_default();
    if raw_ports.is_empty()
        && service_type != ServiceType::ExternalName
        && cluster_ip != ClusterIpRequest::Headless
    {
        return Err(field_error("spec.ports", "Required value"));
    }
    let mut ports: Vec<ServicePort> = Vec::with_capacity(raw_ports.len());
    for (i, p) in raw_ports.iter().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let name = p.name.clone().unwrap_or_default();
        if raw_ports.len() > 1 && name.is_empty() {
            return Err(field_error(field("name"), "Required value"));
        }
        if !name.is_empty() && ports.iter().any(|q| q.name == name) {
            return Err(field_error(
                field("name"),
                format!("Duplicate value: {name:?}"),
            ));
        }
        let protocol = protocol(p.protocol.as_deref(), || field("protocol"))?;
        let port = port_number(p.port, || field("port"))?;
        if ports
            .iter()
            .any(|q| q.port == port && q.protocol == protocol)
        {
            return Err(field_error(
                field("port"),
                format!("Duplicate value: {port}/{}", protocol.as_str()),
            ));
        }
        let target_port = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => {
                TargetPort::Number(port_number(*n, || field("targetPort"))?)
            }
            Some(IntOrString::String(s)) => match s.parse::<i32>() {
                Ok(n) => TargetPort::Number(port_number(n, || field("targetPort"))?),
                Err(_) if valid_port_name(s) => TargetPort::Name(s.clone()),
                Err(_) => {
                    return Err(field_error(
                        field("targetPort"),
                        format!(
                            "Invalid value: {s:?}: must be a port number or an IANA service name"
                        ),
                    ));
                }
            },
        };
        let node_port = match p.node_port {
            None | Some(0) => None,
            Some(n) => Some(port_number(n, || field("nodePort"))?),
        };
        ports.push(ServicePort {
            name,
            protocol,
            port,
            target_port,
            node_port,
        });
    }

    let external_reach = matches!(
        service_type,
        ServiceType::NodePort | ServiceType::LoadBalancer
    ) || !external_ips.is_empty();
    let external_traffic_policy = match spec.external_traffic_policy.as_deref() {
        None | Some("") => TrafficPolicy::Cluster,
        Some(_) if !external_reach => {
            return Err(field_error(
                "spec.externalTrafficPolicy",
                "Invalid value: may only be set for externally-accessible services",
            ));
        }
        Some(p) => traffic_policy(p, "spec.externalTrafficPolicy")?,
    };
    let internal_traffic_policy = match spec.internal_traffic_policy.as_deref() {
        None | Some("") => TrafficPolicy::Cluster,
        Some(p) => traffic_policy(p, "spec.internalTrafficPolicy")?,
    };
    let load_balancer_ip = match spec.load_balancer_ip.as_deref() {
        None | Some("") => None,
        Some(ip) => Some(ipv4(ip, "spec.loadBalancerIP")?),
    };
    let load_balancer_ingress = svc
        .status
        .iter()
        .filter_map(|s| s.load_balancer.as_ref())
        .flat_map(|lb| lb.ingress.iter().flatten())
        .enumerate()
        .filter_map(|(i, ingress)| {
            let ip = ingress.ip.as_deref().filter(|ip| !ip.is_empty())?;
            Some(
                ipv4(ip, || format!("status.loadBalancer.ingress[{i}].ip")).map(|ip| {
                    LoadBalancerIngress {
                        ip,
                        proxy: ingress.ip_mode.as_deref() == Some("Proxy"),
                    }
                }),
            )
        })
        .collect::<Result<_, _>>()?;
    let load_balancer_source_ranges = spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, range)| {
            let range = range.trim();
            range
                .parse::<ipnet::Ipv4Net>()
                .or_else(|_| range.parse::<Ipv4Addr>().map(ipnet::Ipv4Net::from))
                .map(|net| net.trunc())
                .map_err(|_| {
                    field_error(
                        format!("spec.loadBalancerSourceRanges[{i}]"),
                        format!("Invalid value: {range:?}: must be an IPv4 CIDR"),
                    )
                })
        })
        .collect::<Result<_, _>>()?;
    let health_check_node_port = match spec.health_check_node_port {
        None | Some(0) => None,
        Some(n) => Some(port_number(n, "spec.healthCheckNodePort")?),
    };

    Ok(Service {
        id,
        service_type,
        cluster_ip,
        external_ips,
        external_name,
        selector: spec.selector.clone().filter(|s| !s.is_empty()),
        ports,
        session_affinity,
        publish_not_ready_addresses: spec.publish_not_ready_addresses.unwrap_or(false),
        external_traffic_policy,
        internal_traffic_policy,
        load_balancer_ip,
        load_balancer_ingress,
        load_balancer_source_ranges,
        health_check_node_port,
        created: created(&svc.metadata),
        proxied: true,
    })
}

fn traffic_policy(value: &str, field: &str) -> Result<TrafficPolicy, FieldError> {
    match value {
        "Cluster" => Ok(TrafficPolicy::Cluster),
        "Local" => Ok(TrafficPolicy::Local),
        other => Err(field_error(
            field,
            format!("Unsupported value: {other:?}: supported values: \"Cluster\", \"Local\""),
        )),
    }
}

/// `spec.sessionAffinityConfig.clientIP.timeoutSeconds`, validated as the API server does.
fn affinity_timeout(spec: &core::ServiceSpec) -> Result<u32, FieldError> {
    const FIELD: &str = "spec.sessionAffinityConfig.clientIP.timeoutSeconds";
    let given = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match given {
        None => Ok(affinity::DEFAULT_TIMEOUT_S),
        Some(t) if t > 0 && t as i64 <= affinity::MAX_TIMEOUT_S as i64 => Ok(t as u32),
        Some(t) => Err(field_error(
            FIELD,
            format!(
                "Invalid value: {t}: must be greater than 0 and less than or equal to {}",
                affinity::MAX_TIMEOUT_S
            ),
        )),
    }
}

pub fn pod(pod: &core::Pod) -> Result<Pod, FieldError> {
    let id = object_name(&pod.metadata)?;
    let status = pod.status.clone().unwrap_or_default();
    let ip = match status.pod_ip.as_deref() {
        None | Some("") => None,
        Some(ip) => Some(ipv4(ip, "status.podIP")?),
    };
    let serving = !status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "False");
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let mut named_ports = Vec::new();
    for (ci, c) in pod
        .spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .enumerate()
    {
        for (pi, p) in c.ports.iter().flatten().enumerate() {
            let field = |f: &str| format!("spec.containers[{ci}].ports[{pi}].{f}");
            let port = port_number(p.container_port, || field("containerPort"))?;
            let protocol = protocol(p.protocol.as_deref(), || field("protocol"))?;
            if let Some(name) = p.name.as_ref().filter(|n| !n.is_empty()) {
                named_ports.push(NamedPort {
                    name: name.clone(),
                    protocol,
                    port,
                });
            }
        }
    }
    Ok(Pod {
        id,
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        ip,
        // As the EndpointSlice controller states a Pod's conditions.
        conditions: EndpointConditions {
            ready: serving && !terminating,
            serving,
            terminating,
        },
        named_ports,
        node_name: non_empty(pod.spec.as_ref().and_then(|s| s.node_name.as_ref())),
        hostname: non_empty(pod.spec.as_ref().and_then(|s| s.hostname.as_ref())),
        subdomain: non_empty(pod.spec.as_ref().and_then(|s| s.subdomain.as_ref())),
    })
}

fn non_empty(value: Option<&String>) -> Option<String> {
    value.filter(|v| !v.is_empty()).cloned()
}

pub fn endpoints(ep: &core::Endpoints) -> Result<ManualEndpoints, FieldError> {
    let id = object_name(&ep.metadata)?;
    let mut groups = Vec::new();
    for (si, subset) in ep.subsets.iter().flatten().enumerate() {
        let mut ports = Vec::new();
        for (pi, p) in subset.ports.iter().flatten().enumerate() {
            let field = |f: &str| format!("subsets[{si}].ports[{pi}].{f}");
            ports.push(EndpointPort {
                name: p.name.clone().unwrap_or_default(),
                protocol: protocol(p.protocol.as_deref(), || field("protocol"))?,
                port: port_number(p.port, || field("port"))?,
            });
        }
        let mut addresses = Vec::new();
        let mut nodes = BTreeMap::new();
        let mut hostnames = BTreeMap::new();
        for (list, conditions, field) in [
            (&subset.addresses, EndpointConditions::READY, "addresses"),
            (
                &subset.not_ready_addresses,
                EndpointConditions::NOT_READY,
                "notReadyAddresses",
            ),
        ] {
            for (ai, a) in list.iter().flatten().enumerate() {
                let ip = ipv4(&a.ip, || format!("subsets[{si}].{field}[{ai}].ip"))?;
                addresses.push((ip, conditions));
                if let Some(node) = non_empty(a.node_name.as_ref()) {
                    nodes.insert(ip, node);
                }
                if let Some(hostname) = non_empty(a.hostname.as_ref()) {
                    hostnames.insert(ip, hostname);
                }
            }
        }
        groups.push(EndpointGroup {
            ports,
            addresses,
            zone_hints: BTreeMap::new(),
            nodes,
            hostnames,
        });
    }
    Ok(ManualEndpoints {
        service: id.clone(),
        id,
        groups,
    })
}

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

pub fn endpoint_slice(slice: &discovery::EndpointSlice) -> Result<ManualEndpoints, FieldError> {
    let id = object_name(&slice.metadata)?;
    let service_name = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
        .ok_or_else(|| {
            field_error(
                format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
                "Required value",
            )
        })?;
    if slice.address_type != "IPv4" {
        return Err(field_error(
            "addressType",
            format!(
                "Unsupported value: {:?}: only \"IPv4\" is supported",
                slice.address_type
            ),
        ));
    }
    let mut ports = Vec::new();
    for (pi, p) in slice.ports.iter().flatten().enumerate() {
        let field = |f: &str| format!("ports[{pi}].{f}");
        let Some(port) = p.port else {
            return Err(field_error(field("port"), "Required value"));
        };
        ports.push(EndpointPort {
            name: p.name.clone().unwrap_or_default(),
            protocol: protocol(p.protocol.as_deref(), || field("protocol"))?,
            port: port_number(port, || field("port"))?,
        });
    }
    let mut addresses = Vec::new();
    let mut zone_hints = BTreeMap::new();
    let mut nodes = BTreeMap::new();
    let mut hostnames = BTreeMap::new();
    for (ei, e) in slice.endpoints.iter().enumerate() {
        let zones: Vec<String> = e
            .hints
            .iter()
            .flat_map(|h| h.for_zones.iter().flatten())
            .map(|z| z.name.clone())
            .collect();
        // Nil conditions mean "unknown": consumers take ready as true, serving as ready,
        // terminating as false.
        let c = e.conditions.as_ref();
        let ready = c.and_then(|c| c.ready).unwrap_or(true);
        let conditions = EndpointConditions {
            ready,
            serving: c.and_then(|c| c.serving).unwrap_or(ready),
            terminating: c.and_then(|c| c.terminating).unwrap_or(false),
        };
        for (ai, a) in e.addresses.iter().enumerate() {
            let ip = ipv4(a, || format!("endpoints[{ei}].addresses[{ai}]"))?;
            addresses.push((ip, conditions));
            if !zones.is_empty() {
                zone_hints.insert(ip, zones.clone());
            }
            if let Some(node) = non_empty(e.node_name.as_ref()) {
                nodes.insert(ip, node);
            }
            if let Some(hostname) = non_empty(e.hostname.as_ref()) {
                hostnames.insert(ip, hostname);
            }
        }
    }
    Ok(ManualEndpoints {
        service: ObjectName {
            namespace: id.namespace.clone(),
            name: service_name,
        },
        id,
        groups: vec![EndpointGroup {
            ports,
            addresses,
            zone_hints,
            nodes,
            hostnames,
        }],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(yaml: &str) -> Result<Service, FieldError> {
        service(&serde_yaml::from_str(yaml).unwrap())
    }

    #[test]
    fn service_defaults_follow_kubernetes() {
        let s = svc("metadata: {name: a}\nspec:\n  selector: {app: a}\n  ports: [{port: 80}]\n")
            .unwrap();
        assert_eq!(
            s.id,
            ObjectName {
                namespace: "default".into(),
                name: "a".into()
            }
        );
        assert_eq!(s.service_type, ServiceType::ClusterIP);
        assert_eq!(s.cluster_ip, ClusterIpRequest::Allocate);
        assert_eq!(s.ports[0].protocol, Protocol::Tcp);
        assert_eq!(s.ports[0].target_port, TargetPort::Number(80));
        assert_eq!(s.session_affinity, SessionAffinity::None);
    }

    #[test]
    fn client_ip_affinity_takes_its_timeout() {
        let base =
            "metadata: {name: a}\nspec:\n  ports: [{port: 80}]\n  sessionAffinity: ClientIP\n";
        assert_eq!(
            svc(base).unwrap().session_affinity,
            SessionAffinity::ClientIp { timeout_s: 10_800 }
        );
        let with = |t: i64| {
            svc(&format!(
                "{base}  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {t}}}}}\n"
            ))
        };
        assert_eq!(
            with(2).unwrap().session_affinity,
            SessionAffinity::ClientIp { timeout_s: 2 }
        );
        assert_eq!(
            with(86_400).unwrap().session_affinity,
            SessionAffinity::ClientIp { timeout_s: 86_400 }
        );
        for bad in [0, -1, 86_401] {
            let e = with(bad).unwrap_err();
            assert_eq!(
                e.field,
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
            );
            assert!(e.message.contains(&bad.to_string()), "{e:?}");
        }
    }

    #[test]
    fn named_and_numeric_target_ports() {
        let s = svc("metadata: {name: a}\nspec:\n  ports:\n  - {name: http, port: 80, targetPort: web}\n  - {name: dns, port: 53, protocol: UDP, targetPort: \"5353\"}\n").unwrap();
        assert_eq!(s.ports[0].target_port, TargetPort::Name("web".into()));
        assert_eq!(s.ports[1].target_port, TargetPort::Number(5353));
        assert_eq!(s.ports[1].protocol, Protocol::Udp);
    }

    #[test]
    fn invalid_fields_are_named() {
        let cases = [
            (
                "metadata: {name: a}\nspec: {ports: [{port: 70000}]}",
                "spec.ports[0].port",
            ),
            (
                "metadata: {name: a}\nspec: {ports: [{port: 80, protocol: ICMP}]}",
                "spec.ports[0].protocol",
            ),
            (
                "metadata: {name: a}\nspec: {clusterIP: 10.0.0.300, ports: [{port: 80}]}",
                "spec.clusterIP",
            ),
            (
                "metadata: {name: a}\nspec: {ports: [{port: 80}, {port: 81}]}",
                "spec.ports[0].name",
            ),
            (
                "metadata: {name: a}\nspec: {ports: [{name: a, port: 80}, {name: b, port: 80}]}",
                "spec.ports[1].port",
            ),
            (
                "metadata: {name: a}\nspec: {ports: [{port: 80, targetPort: Not_A_Name}]}",
                "spec.ports[0].targetPort",
            ),
            ("metadata: {}\nspec: {ports: [{port: 80}]}", "metadata.name"),
            (
                "metadata: {name: a}\nspec: {type: Weird, ports: [{port: 80}]}",
                "spec.type",
            ),
            ("metadata: {name: a}\nspec: {}", "spec.ports"),
            (
                "metadata: {name: a}\nspec: {type: ExternalName}",
                "spec.externalName",
            ),
        ];
        for (yaml, field) in cases {
            let err = svc(yaml).expect_err(yaml);
            assert_eq!(err.field, field, "{yaml}: {err}");
        }
    }

    #[test]
    fn same_port_on_tcp_and_udp_is_allowed() {
        let s = svc("metadata: {name: dns}\nspec:\n  ports:\n  - {name: tcp, port: 53}\n  - {name: udp, port: 53, protocol: UDP}\n").unwrap();
        assert_eq!(s.ports.len(), 2);
    }

    #[test]
    fn pod_readiness_and_named_ports() {
        let p: core::Pod = serde_yaml::from_str(
            "metadata: {name: p, labels: {app: x}}\nspec:\n  containers:\n  - name: c\n    ports: [{name: web, containerPort: 8080}]\nstatus:\n  podIP: 198.18.1.2\n  conditions: [{type: Ready, status: \"False\"}]\n",
        )
        .unwrap();
        let p = pod(&p).unwrap();
        assert_eq!(p.ip, Some(Ipv4Addr::new(198, 18, 1, 2)));
        assert_eq!(p.conditions, EndpointConditions::NOT_READY);
        assert_eq!(
            p.named_ports,
            vec![NamedPort {
                name: "web".into(),
                protocol: Protocol::Tcp,
                port: 8080
            }]
        );

        let p: core::Pod = serde_yaml::from_str(
            "metadata: {name: p}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 198.18.1.3}\n",
        )
        .unwrap();
        assert_eq!(
            pod(&p).unwrap().conditions,
            EndpointConditions::READY,
            "no Ready condition means ready"
        );

        let p: core::Pod = serde_yaml::from_str(
            "metadata: {name: p, deletionTimestamp: \"2026-01-01T00:00:00Z\"}\nspec: {containers: [{name: c}]}\nstatus: {podIP: 198.18.1.3}\n",
        )
        .unwrap();
        assert_eq!(
            pod(&p).unwrap().conditions,
            EndpointConditions {
                ready: false,
                serving: true,
                terminating: true
            },
            "a Pod being deleted is terminating, and serving while its Ready condition holds"
        );
    }

    #[test]
    fn endpoints_and_slices() {
        let e: core::Endpoints = serde_yaml::from_str(
            "metadata: {name: ext}\nsubsets:\n- addresses: [{ip: 198.18.5.1}]\n  notReadyAddresses: [{ip: 198.18.5.2}]\n  ports: [{port: 80}]\n",
        )
        .unwrap();
        let e = endpoints(&e).unwrap();
        assert_eq!(e.service.name, "ext");
        assert_eq!(
            e.groups[0].addresses,
            vec![
                (Ipv4Addr::new(198, 18, 5, 1), EndpointConditions::READY),
                (Ipv4Addr::new(198, 18, 5, 2), EndpointConditions::NOT_READY)
            ]
        );

        let s: discovery::EndpointSlice = serde_yaml::from_str(
            "metadata: {name: ext-abc, labels: {kubernetes.io/service-name: ext}}\naddressType: IPv4\nendpoints:\n- addresses: [198.18.5.3]\n  conditions: {ready: false}\n- addresses: [198.18.5.4]\n- addresses: [198.18.5.5]\n  conditions: {ready: false, serving: true, terminating: true}\nports: [{port: 8080, name: http}]\n",
        )
        .unwrap();
        let s = endpoint_slice(&s).unwrap();
        assert_eq!(s.service.name, "ext");
        assert_eq!(
            s.groups[0].addresses,
            vec![
                (Ipv4Addr::new(198, 18, 5, 3), EndpointConditions::NOT_READY),
                (Ipv4Addr::new(198, 18, 5, 4), EndpointConditions::READY),
                (
                    Ipv4Addr::new(198, 18, 5, 5),
                    EndpointConditions {
                        ready: false,
                        serving: true,
                        terminating: true
                    }
                )
            ]
        );
        assert_eq!(s.groups[0].ports[0].port, 8080);

        let bad: discovery::EndpointSlice =
            serde_yaml::from_str("metadata: {name: x}\naddressType: IPv4\nendpoints: []\n")
                .unwrap();
        assert!(
            endpoint_slice(&bad)
                .unwrap_err()
                .field
                .starts_with("metadata.labels")
        );
    }
}
