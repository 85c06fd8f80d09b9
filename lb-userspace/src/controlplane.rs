//! The part of the control plane that standalone mode does itself: ClusterIP allocation and
//! endpoints from selectors over Pods (or from manual Endpoints / EndpointSlices). Pure.
// A fast hash (foldhash, hashbrown's own) for the maps of a sync: SipHash was the busiest
// user-space function in a profile of a 100,000-Service sync. Keys come from the cluster's
// objects, not from packets, and the seed is still random per process.
use foldhash::{HashMap, HashMapExt as _, HashSet, HashSetExt as _};
use std::{
    collections::{BTreeMap, BTreeSet, hash_map::Entry},
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::SystemTime,
};

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::external::{AllocationRanges, Allocator, DEFAULT_NODE_PORT_RANGE, External};
use crate::model::{
    ClusterIpRequest, EndpointConditions, FieldError, ManualEndpoints, Object, ObjectKey,
    ObjectName, Pod, Service, ServicePort, ServiceType, TargetPort,
};

/// One service port with the endpoints that serve it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ResolvedPort {
    pub port: ServicePort,
    /// Ready endpoints: they take new connections.
    pub ready: Vec<SocketAddrV4>,
    /// Serving and terminating: they take new connections only when none is ready.
    pub terminating: Vec<SocketAddrV4>,
    /// Neither ready nor serving-and-terminating: no new connection, but established ones go on.
    pub not_ready: Vec<SocketAddrV4>,
    /// The endpoints (of all three lists) on this node, sorted.
    pub on_node: Vec<SocketAddrV4>,
}

impl ResolvedPort {
    /// The endpoints that take new connections, as kube-proxy picks them: the ready ones, or
    /// when there is none, the serving-and-terminating ones (KEP-1669).
    pub fn serving(&self) -> &[SocketAddrV4] {
        if self.ready.is_empty() {
            &self.terminating
        } else {
            &self.ready
        }
    }

    /// Every endpoint that keeps its established connections but takes no new one.
    pub fn draining(&self) -> impl Iterator<Item = SocketAddrV4> + '_ {
        let serving_ready = !self.ready.is_empty();
        self.not_ready
            .iter()
            .chain(if serving_ready {
                self.terminating.iter()
            } else {
                [].iter()
            })
            .copied()
    }

    /// The same port with only this node's endpoints (the Local traffic policies).
    pub fn local(&self) -> ResolvedPort {
        let here = |list: &[SocketAddrV4]| -> Vec<SocketAddrV4> {
            list.iter()
                .filter(|a| self.on_node.binary_search(a).is_ok())
                .copied()
                .collect()
        };
        ResolvedPort {
            port: self.port.clone(),
            ready: here(&self.ready),
            terminating: here(&self.terminating),
            not_ready: here(&self.not_ready),
            on_node: self.on_node.clone(),
        }
    }
}

/// An endpoint address of a headless Service, as DNS publishes it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct DnsEndpoint {
    pub ip: Ipv4Addr,
    /// Its hostname (a Pod's `spec.hostname` when its `spec.subdomain` names the Service, or
    /// an endpoint's `hostname`).
    pub hostname: Option<String>,
}

/// A Service as the cluster would present it: with its address and its endpoints.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceState {
    pub service: Arc<Service>,
    /// `None` for headless and ExternalName Services.
    pub cluster_ip: Option<Ipv4Addr>,
    pub ports: Vec<ResolvedPort>,
    /// Headless Services: the ready endpoint addresses (all of them with
    /// `publishNotReadyAddresses`), whatever their ports, sorted. Empty for other Services.
    pub dns_endpoints: Vec<DnsEndpoint>,
    /// Its nodePorts and LoadBalancer addresses.
    pub external: External,
    #[serde(skip)]
    pub created: SystemTime,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServiceError {
    pub service: ObjectName,
    pub error: FieldError,
}

/// A change to the objects the control plane works from.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    Upsert(Object),
    Delete(ObjectKey),
}

/// A Service whose state changed in the last `compute`, with the state it had before (boxed:
/// a first computation of 100,000 Services has none, and would otherwise carry 100,000
/// empty states' room).
#[derive(Debug)]
pub struct ServiceChange {
    pub name: ObjectName,
    pub before: Option<Box<ServiceState>>,
}

/// Namespace, label key and label value.
type LabelKey = (String, String, String);

/// Computes Service states incrementally: objects arrive as changes, and only the Services a
/// change can affect are computed again, from indexes kept between computations. One endpoint
/// change among 10,000 Services costs what one Service costs.
pub struct ControlPlane {
    /// Where this agent allocates ClusterIPs from; `None` when the API server allocates them
    /// (cluster mode: every address it gave is taken as it is).
    cidr: Option<Ipv4Net>,
    /// The latest version of every Service, as given.
    /// Shared with the Service's state (one copy of each Service, not two).
    services: HashMap<ObjectName, Arc<Service>>,
    /// Services with a selector, by the selector's first pair: only such a Service can select a
    /// Pod that has this label.
    selectors_by_label: HashMap<LabelKey, HashSet<ObjectName>>,
    endpoints: EndpointSources,
    /// Which Service holds each address handed out.
    owners: HashMap<Ipv4Addr, ObjectName>,
    /// Services whose latest version is rejected, and why.
    rejected: BTreeMap<ObjectName, FieldError>,
    /// Every Service accepted, in the version accepted last and with its address: an address
    /// never moves while its Service exists, and a version that cannot be accepted leaves the
    /// previous one in force.
    states: BTreeMap<ObjectName, ServiceState>,
    /// Services to compute at the next `compute`.
    dirty: BTreeSet<ObjectName>,
    /// Addresses Services held before this agent started (from the pinned record): kept for
    /// them through the first computation, as if they had been accepted here.
    held_before: HashMap<ObjectName, Ipv4Addr>,
    /// This node's zone (its `topology.kubernetes.io/zone` label), for topology hints.
    zone: Option<String>,
    /// This node's name, for the Local traffic policies.
    node_name: Option<String>,
    /// Which Service holds each nodePort and LoadBalancer address.
    external: Allocator,
}

impl ControlPlane {
    /// Standalone mode: this agent allocates ClusterIPs from `cidr`.
    pub fn new(cidr: Ipv4Net) -> Self {
        let mut control = Self::with_cidr(Some(cidr));
        control.external = Allocator::new(AllocationRanges {
            node_ports: Some(DEFAULT_NODE_PORT_RANGE),
            load_balancer_cidr: None,
        });
        control
    }

    /// Standalone mode: where nodePorts and LoadBalancer addresses are allocated from.
    pub fn set_allocation_ranges(&mut self, ranges: AllocationRanges) {
        self.external = Allocator::new(ranges);
    }

    /// Cluster mode: the API server has allocated every ClusterIP; a Service without one (which
    /// the API server never stores) is rejected, not given an address.
    pub fn following_api_server() -> Self {
        Self::with_cidr(None)
    }

    fn with_cidr(cidr: Option<Ipv4Net>) -> Self {
        Self {
            cidr,
            services: HashMap::new(),
            selectors_by_label: HashMap::new(),
            endpoints: EndpointSources::default(),
            owners: HashMap::new(),
            rejected: BTreeMap::new(),
            states: BTreeMap::new(),
            dirty: BTreeSet::new(),
            held_before: HashMap::new(),
            zone: None,
            node_name: None,
            external: Allocator::default(),
        }
    }

    /// This node's name: the Local traffic policies send traffic to the endpoints on it.
    pub fn set_node_name(&mut self, name: Option<String>) {
        if self.node_name != name {
            self.node_name = name;
            self.dirty.extend(self.services.keys().cloned());
        }
    }

    /// This node's zone: Services whose endpoints carry topology hints send new connections
    /// to the endpoints meant for it. Every Service is computed again when it changes.
    pub fn set_zone(&mut self, zone: Option<String>) {
        if self.zone != zone {
            self.zone = zone;
            self.dirty.extend(self.services.keys().cloned());
        }
    }

    /// Addresses held by Services before a restart: at the next computation each goes back to
    /// its Service if the Service still exists and its spec still allows it, before any other
    /// Service may ask for it. Holders that are gone leave their address free.
    pub fn held_before(&mut self, holders: impl IntoIterator<Item = (Ipv4Addr, ObjectName)>) {
        self.held_before = holders.into_iter().map(|(ip, name)| (name, ip)).collect();
    }

    /// Takes in one change; the Services it affects are computed at the next `compute`.
    pub fn apply(&mut self, change: Change) {
        match change {
            Change::Upsert(object) => {
                let key = object.key();
                match object {
                    Object::Service(svc) => self.set_service(key.1, Some(svc)),
                    Object::Pod(pod) => self.set_pod(key.1, Some(pod)),
                    Object::Endpoints(m) | Object::EndpointSlice(m) => {
                        self.set_manual(key, Some(m))
                    }
                }
            }
            Change::Delete(key) => match key.0 {
                "Service" => self.set_service(key.1, None),
                "Pod" => self.set_pod(key.1, None),
                _ => self.set_manual(key, None),
            },
        }
    }

    /// Makes `objects` the whole set: everything else is deleted.
    pub fn replace_all(&mut self, objects: impl IntoIterator<Item = Object>) {
        let mut present = HashSet::new();
        for object in objects {
            present.insert(object.key());
            self.apply(Change::Upsert(object));
        }
        let gone: Vec<ObjectKey> = self
            .services
            .keys()
            .map(|name| ("Service", name.clone()))
            .chain(self.endpoints.keys())
            .filter(|key| !present.contains(key))
            .collect();
        for key in gone {
            self.apply(Change::Delete(key));
        }
    }

    fn set_service(&mut self, name: ObjectName, svc: Option<Service>) {
        if self.services.get(&name).map(|s| &**s) == svc.as_ref() {
            return;
        }
        if let Some(old) = self.services.remove(&name)
            && let Some(label) = selector_label(&old)
        {
            remove_from(&mut self.selectors_by_label, &label, &name);
        }
        if let Some(svc) = svc {
            if let Some(label) = selector_label(&svc) {
                self.selectors_by_label
                    .entry(label)
                    .or_default()
                    .insert(name.clone());
            }
            self.services.insert(name.clone(), Arc::new(svc));
        }
        self.dirty.insert(name);
    }

    fn set_pod(&mut self, name: ObjectName, pod: Option<Pod>) {
        let (old, new) = match self.endpoints.set_pod(name, pod) {
            Some(versions) => versions,
            None => return,
        };
        for pod in [old.as_ref(), new.as_ref()].into_iter().flatten() {
            for (k, v) in &pod.labels {
                let label = (pod.id.namespace.clone(), k.clone(), v.clone());
                for service in self.selectors_by_label.get(&label).into_iter().flatten() {
                    let selects = self.services[service]
                        .selector
                        .as_ref()
                        .is_some_and(|s| selects(s, &pod.labels));
                    if selects {
                        self.dirty.insert(service.clone());
                    }
                }
            }
        }
        // A rejected Service runs on its accepted version, whose selector is not indexed.
        self.dirty.extend(self.rejected.keys().cloned());
    }

    fn set_manual(&mut self, key: ObjectKey, manual: Option<ManualEndpoints>) {
        self.dirty.extend(self.endpoints.set_manual(key, manual));
    }

    /// Computes the Services that changes affected; returns those whose state changed.
    pub fn compute(&mut self, now: SystemTime) -> Vec<ServiceChange> {
        let changed = self.compute_dirty(now);
        self.held_before.clear();
        changed
    }

    /// Computes only the affected Services whose Service and some of whose EndpointSlices have
    /// come; the others wait for the next `compute`. While the first lists still arrive, this
    /// computes ahead what is there, and a Service is seldom computed before its endpoints and
    /// again after them. Addresses held before a restart stay held for that next `compute`.
    pub fn compute_listed(&mut self, now: SystemTime) -> Vec<ServiceChange> {
        // The waiting ones can be most of 100,000 at every call: they are looked at, not moved.
        let listed: BTreeSet<ObjectName> = self
            .dirty
            .iter()
            .filter(|name| self.services.contains_key(*name) && self.endpoints.has_manual(name))
            .cloned()
            .collect();
        let mut waiting = std::mem::take(&mut self.dirty);
        for name in &listed {
            waiting.remove(name);
        }
        self.dirty = listed;
        let changed = self.compute_dirty(now);
        // Computing leaves nothing dirty.
        self.dirty = waiting;
        changed
    }

    fn compute_dirty(&mut self, now: SystemTime) -> Vec<ServiceChange> {
        let mut before: BTreeMap<ObjectName, Option<Box<ServiceState>>> = BTreeMap::new();
        while !self.dirty.is_empty() {
            let dirty = std::mem::take(&mut self.dirty);
            // An address given up may be the one a rejected Service asked for: try them again.
            if self.compute_round(&dirty, now, &mut before) {
                self.dirty.extend(self.rejected.keys().cloned());
            }
        }
        before
            .into_iter()
            .filter(|(name, before)| self.states.get(name) != before.as_deref())
            .map(|(name, before)| ServiceChange { name, before })
            .collect()
    }

    /// Computes `dirty`; records the state each changed Service had first in `before`. Returns
    /// whether an address was given up.
    fn compute_round(
        &mut self,
        dirty: &BTreeSet<ObjectName>,
        now: SystemTime,
        before: &mut BTreeMap<ObjectName, Option<Box<ServiceState>>>,
    ) -> bool {
        let (addresses, mut errors) = self.allocate(dirty);
        let mut released = false;
        for name in dirty {
            match errors.remove(name) {
                Some(error) => self.rejected.insert(name.clone(), error),
                None => self.rejected.remove(name),
            };
            let old = self.states.get(name);
            let mut chosen = match (self.services.get(name), addresses.get(name)) {
                (Some(svc), Some(ip)) => Some((svc, *ip)),
                // Rejected now but accepted before: the previous version stays in force.
                (Some(_), None) => old.map(|s| (&s.service, s.cluster_ip)),
                (None, _) => None,
            };
            // The nodePorts and LoadBalancer addresses of a version accepted so far: one that
            // cannot have them is rejected too (and gives back the ClusterIP it just got).
            let mut external = old.map(|s| s.external.clone());
            if let (Some((svc, ip)), true) = (chosen, addresses.contains_key(name)) {
                match self.external.assign(svc, old.map(|s| &s.external)) {
                    Ok(assigned) => external = Some(assigned),
                    Err(error) => {
                        self.rejected.insert(name.clone(), error);
                        if let Some(ip) = ip
                            && old.and_then(|s| s.cluster_ip) != Some(ip)
                        {
                            self.owners.remove(&ip);
                        }
                        chosen = old.map(|s| (&s.service, s.cluster_ip));
                    }
                }
            }
            if let Some(old) = old {
                self.external.release(
                    name,
                    &old.external,
                    external.as_ref().filter(|_| chosen.is_some()),
                );
            }
            let previous_ip = old.and_then(|s| s.cluster_ip);
            let new_ip = chosen.and_then(|(_, ip)| ip);
            if let Some(ip) = previous_ip
                && Some(ip) != new_ip
            {
                self.owners.remove(&ip);
                released = true;
            }
            let Some((svc, cluster_ip)) = chosen else {
                if let Some(old) = self.states.remove(name) {
                    before.entry(name.clone()).or_insert(Some(Box::new(old)));
                }
                continue;
            };
            // Without a creation time (a manifest), a Service is as old as its first state.
            let created = svc.created.or(old.map(|s| s.created)).unwrap_or(now);
            let ports = resolve_ports(
                svc,
                &self.endpoints,
                self.zone.as_deref(),
                self.node_name.as_deref(),
            );
            let external = external.unwrap_or_default();
            let dns_endpoints = resolve_dns_endpoints(svc, &self.endpoints);
            let unchanged = old.is_some_and(|old| {
                old.cluster_ip == cluster_ip
                    && old.created == created
                    && old.ports == ports
                    && old.dns_endpoints == dns_endpoints
                    && old.external == external
                    && old.service == *svc
            });
            if !unchanged {
                let state = ServiceState {
                    service: svc.clone(),
                    cluster_ip,
                    ports,
                    dns_endpoints,
                    external,
                    created,
                };
                let old = self.states.insert(name.clone(), state);
                before.entry(name.clone()).or_insert(old.map(Box::new));
            }
        }
        released
    }

    /// Address of every Service in `dirty` that can be accepted (`None` inside:
    /// headless/ExternalName), and why the others cannot. New addresses are recorded in
    /// `owners`; the caller gives up the ones Services leave.
    fn allocate<'d>(
        &mut self,
        dirty: &'d BTreeSet<ObjectName>,
    ) -> (
        HashMap<&'d ObjectName, Option<Ipv4Addr>>,
        BTreeMap<ObjectName, FieldError>,
    ) {
        let mut result = HashMap::new();
        let mut errors = BTreeMap::new();
        let wants_ip = |s: &Service| {
            s.service_type != ServiceType::ExternalName
                && s.cluster_ip != ClusterIpRequest::Headless
        };
        let present = || {
            dirty
                .iter()
                .filter_map(|name| Some((name, self.services.get(name)?)))
        };
        // 1. Services keep the address they have, if their spec still allows it. The address
        //    stays reserved this round even if the spec moves away from it: a rejected update
        //    falls back to the accepted version and its address.
        for (name, svc) in present() {
            if !wants_ip(svc) {
                result.insert(name, None);
                continue;
            }
            let accepted = self.states.get(name).and_then(|s| s.cluster_ip);
            if let Some(ip) = accepted {
                let keeps = match svc.cluster_ip {
                    ClusterIpRequest::Allocate => true,
                    ClusterIpRequest::Fixed(want) => want == ip,
                    ClusterIpRequest::Headless => false,
                };
                if keeps {
                    result.insert(name, Some(ip));
                }
            } else if let Some(&ip) = self.held_before.get(name) {
                let keeps = match svc.cluster_ip {
                    ClusterIpRequest::Allocate => self.usable(ip),
                    ClusterIpRequest::Fixed(want) => want == ip && self.usable(ip),
                    ClusterIpRequest::Headless => false,
                };
                if keeps && !self.owners.contains_key(&ip) {
                    self.owners.insert(ip, name.clone());
                    result.insert(name, Some(ip));
                }
            }
        }
        // 2. Addresses chosen by the user.
        for (name, svc) in present() {
            let ClusterIpRequest::Fixed(ip) = svc.cluster_ip else {
                continue;
            };
            if result.contains_key(name) || !wants_ip(svc) {
                continue;
            }
            let usable = self.usable(ip);
            let message = match self.owners.entry(ip) {
                _ if !usable => format!(
                    "Invalid value: \"{ip}\": provided IP is not in the valid range. The range of valid IPs is {}",
                    self.cidr.map_or("none".to_string(), |c| c.to_string())
                ),
                Entry::Occupied(_) => {
                    format!("Invalid value: \"{ip}\": provided IP is already allocated")
                }
                Entry::Vacant(free) => {
                    free.insert(name.clone());
                    result.insert(name, Some(ip));
                    continue;
                }
            };
            errors.insert(
                name.clone(),
                FieldError {
                    field: "spec.clusterIP".into(),
                    message,
                },
            );
        }
        // 3. Allocation: a slot derived from the name, so an agent restarted on the same
        //    manifests gives every Service the address it had.
        let Some(cidr) = self.cidr else {
            for (name, svc) in present() {
                if !result.contains_key(name)
                    && svc.cluster_ip == ClusterIpRequest::Allocate
                    && wants_ip(svc)
                {
                    errors.insert(
                        name.clone(),
                        FieldError {
                            field: "spec.clusterIP".into(),
                            message: "Required value: not allocated yet (the API server allocates ClusterIPs)".into(),
                        },
                    );
                }
            }
            return (result, errors);
        };
        let size = 1u64 << (32 - cidr.prefix_len());
        let base = u32::from(cidr.network()) as u64;
        for (name, svc) in present() {
            if result.contains_key(name)
                || svc.cluster_ip != ClusterIpRequest::Allocate
                || !wants_ip(svc)
            {
                continue;
            }
            let start = fnv1a(format!("{}/{}", name.namespace, name.name).as_bytes()) % size;
            let found = (0..size)
                .map(|i| Ipv4Addr::from((base + (start + i) % size) as u32))
                .find(|ip| self.usable(*ip) && !self.owners.contains_key(ip));
            match found {
                Some(ip) => {
                    self.owners.insert(ip, name.clone());
                    result.insert(name, Some(ip));
                }
                None => {
                    errors.insert(
                        name.clone(),
                        FieldError {
                            field: "spec.clusterIP".into(),
                            message: format!("Internal error: no address left in {cidr}"),
                        },
                    );
                }
            }
        }
        (result, errors)
    }

    /// In the CIDR, and neither its network nor (for prefixes up to /30) broadcast address.
    /// Any address the API server gave.
    fn usable(&self, ip: Ipv4Addr) -> bool {
        let Some(cidr) = self.cidr else {
            return !ip.is_unspecified();
        };
        cidr.contains(&ip)
            && (cidr.prefix_len() >= 31 || (ip != cidr.network() && ip != cidr.broadcast()))
    }

    /// Every Service with its address and endpoints, by namespace and name.
    pub fn states(&self) -> impl Iterator<Item = &ServiceState> {
        self.states.values()
    }

    /// How many Services are accepted.
    pub fn services_len(&self) -> usize {
        self.states.len()
    }

    pub fn state(&self, name: &ObjectName) -> Option<&ServiceState> {
        self.states.get(name)
    }

    /// Services whose latest version cannot be accepted, and why.
    pub fn errors(&self) -> impl Iterator<Item = ServiceError> + '_ {
        self.rejected.iter().map(|(name, error)| ServiceError {
            service: name.clone(),
            error: error.clone(),
        })
    }
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn selector_label(svc: &Service) -> Option<LabelKey> {
    let (k, v) = svc.selector.as_ref()?.iter().next()?;
    Some((svc.id.namespace.clone(), k.clone(), v.clone()))
}

fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

fn remove_from<K: Eq + std::hash::Hash, V: Eq + std::hash::Hash>(
    index: &mut HashMap<K, HashSet<V>>,
    key: &K,
    value: &V,
) {
    if let Some(set) = index.get_mut(key) {
        set.remove(value);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

/// Pods and manual endpoints, indexed so that resolving a Service does not scan every object.
#[derive(Default)]
struct EndpointSources {
    pods: HashMap<ObjectName, Pod>,
    pods_by_label: HashMap<LabelKey, HashSet<ObjectName>>,
    manual: HashMap<ObjectKey, ManualEndpoints>,
    manual_by_service: HashMap<ObjectName, Vec<ObjectKey>>,
}

impl EndpointSources {
    /// Whether endpoints objects (EndpointSlices, Endpoints) for `service` are present.
    fn has_manual(&self, service: &ObjectName) -> bool {
        self.manual_by_service.contains_key(service)
    }

    fn keys(&self) -> impl Iterator<Item = ObjectKey> + '_ {
        self.pods
            .keys()
            .map(|name| ("Pod", name.clone()))
            .chain(self.manual.keys().cloned())
    }

    /// Replaces a Pod; returns its old and new version, or `None` when nothing changed.
    fn set_pod(
        &mut self,
        name: ObjectName,
        pod: Option<Pod>,
    ) -> Option<(Option<Pod>, Option<Pod>)> {
        if self.pods.get(&name) == pod.as_ref() {
            return None;
        }
        let old = self.pods.remove(&name);
        for (k, v) in old.iter().flat_map(|p| &p.labels) {
            let label = (name.namespace.clone(), k.clone(), v.clone());
            remove_from(&mut self.pods_by_label, &label, &name);
        }
        if let Some(pod) = &pod {
            for (k, v) in &pod.labels {
                self.pods_by_label
                    .entry((name.namespace.clone(), k.clone(), v.clone()))
                    .or_default()
                    .insert(name.clone());
            }
            self.pods.insert(name, pod.clone());
        }
        Some((old, pod))
    }

    /// Replaces manual endpoints; returns the Services they were and are for.
    fn set_manual(&mut self, key: ObjectKey, manual: Option<ManualEndpoints>) -> Vec<ObjectName> {
        if self.manual.get(&key) == manual.as_ref() {
            return Vec::new();
        }
        let mut services = Vec::new();
        if let Some(old) = self.manual.remove(&key) {
            if let Some(keys) = self.manual_by_service.get_mut(&old.service) {
                keys.retain(|k| *k != key);
                if keys.is_empty() {
                    self.manual_by_service.remove(&old.service);
                }
            }
            services.push(old.service);
        }
        if let Some(m) = manual {
            self.manual_by_service
                .entry(m.service.clone())
                .or_default()
                .push(key.clone());
            services.push(m.service.clone());
            self.manual.insert(key, m);
        }
        services
    }

    /// Pods of `namespace` whose labels contain every pair of `selector`.
    fn selected<'s>(
        &'s self,
        namespace: &str,
        selector: &'s BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'s Pod> + 's {
        let candidates = selector.iter().next().and_then(|(k, v)| {
            self.pods_by_label
                .get(&(namespace.to_string(), k.clone(), v.clone()))
        });
        candidates
            .into_iter()
            .flatten()
            .filter_map(|name| self.pods.get(name))
            .filter(move |pod| selects(selector, &pod.labels))
    }

    fn manual_for(&self, service: &ObjectName) -> impl Iterator<Item = &ManualEndpoints> {
        self.manual_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|key| self.manual.get(key))
    }
}

fn resolve_ports(
    svc: &Service,
    sources: &EndpointSources,
    zone: Option<&str>,
    node: Option<&str>,
) -> Vec<ResolvedPort> {
    if svc.service_type == ServiceType::ExternalName {
        return Vec::new();
    }
    svc.ports
        .iter()
        .map(|port| {
            let mut ready = BTreeSet::new();
            let mut terminating = BTreeSet::new();
            let mut not_ready = BTreeSet::new();
            let mut hinted: BTreeMap<SocketAddrV4, &[String]> = BTreeMap::new();
            let mut on_node = BTreeSet::new();
            let here = |name: Option<&String>| node.is_some() && name.map(String::as_str) == node;
            let mut add = |addr: SocketAddrV4, c: EndpointConditions| {
                // publishNotReadyAddresses: the endpoint controller reports every one ready.
                if c.ready || svc.publish_not_ready_addresses {
                    ready.insert(addr)
                } else if c.serving && c.terminating {
                    terminating.insert(addr)
                } else {
                    not_ready.insert(addr)
                };
            };
            match &svc.selector {
                Some(selector) => {
                    for pod in sources.selected(&svc.id.namespace, selector) {
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
                            let addr = SocketAddrV4::new(ip, target);
                            add(addr, pod.conditions);
                            if here(pod.node_name.as_ref()) {
                                on_node.insert(addr);
                            }
                        }
                    }
                }
                None => {
                    for m in sources.manual_for(&svc.id) {
                        for group in &m.groups {
                            let Some(ep_port) = group
                                .ports
                                .iter()
                                .find(|p| p.name == port.name && p.protocol == port.protocol)
                            else {
                                continue;
                            };
                            for (ip, conditions) in &group.addresses {
                                let addr = SocketAddrV4::new(*ip, ep_port.port);
                                add(addr, *conditions);
                                if let Some(zones) = group.zone_hints.get(ip) {
                                    hinted.insert(addr, zones);
                                }
                                if here(group.nodes.get(ip)) {
                                    on_node.insert(addr);
                                }
                            }
                        }
                    }
                }
            }
            // Topology hints, as kube-proxy reads them: when every ready endpoint has zone hints
            // and some are meant for this node's zone, only those take new connections; the
            // others keep their established ones. Otherwise the hints are ignored.
            let for_zone = |a: &SocketAddrV4| {
                hinted
                    .get(a)
                    .is_some_and(|zones| zone.is_some_and(|z| zones.iter().any(|h| h == z)))
            };
            let all_hinted = ready.iter().all(|a| hinted.contains_key(a));
            if all_hinted && ready.iter().any(for_zone) {
                let (kept, elsewhere): (BTreeSet<_>, BTreeSet<_>) =
                    ready.iter().copied().partition(|a| for_zone(a));
                ready = kept;
                not_ready.extend(elsewhere);
            }
            // An address in two states (two slices) counts in the better one.
            let terminating: BTreeSet<_> = terminating.difference(&ready).copied().collect();
            let not_ready = not_ready
                .iter()
                .filter(|a| !ready.contains(a) && !terminating.contains(a))
                .copied()
                .collect();
            ResolvedPort {
                port: port.clone(),
                ready: ready.into_iter().collect(),
                terminating: terminating.into_iter().collect(),
                not_ready,
                on_node: on_node.into_iter().collect(),
            }
        })
        .collect()
}

/// The ready endpoint addresses of a headless Service, with their hostnames, as the
/// EndpointSlice controller and cluster DNS see them: a Pod's hostname counts when its
/// subdomain is the Service's name.
fn resolve_dns_endpoints(svc: &Service, sources: &EndpointSources) -> Vec<DnsEndpoint> {
    if svc.cluster_ip != ClusterIpRequest::Headless || svc.service_type == ServiceType::ExternalName
    {
        return Vec::new();
    }
    let published = |c: EndpointConditions| c.ready || svc.publish_not_ready_addresses;
    let mut found: BTreeMap<Ipv4Addr, Option<String>> = BTreeMap::new();
    match &svc.selector {
        Some(selector) => {
            for pod in sources.selected(&svc.id.namespace, selector) {
                let Some(ip) = pod.ip.filter(|_| published(pod.conditions)) else {
                    continue;
                };
                let hostname = pod
                    .hostname
                    .clone()
                    .filter(|_| pod.subdomain.as_deref() == Some(svc.id.name.as_str()));
                let slot = found.entry(ip).or_default();
                if hostname.is_some() {
                    *slot = hostname;
                }
            }
        }
        None => {
            for group in sources.manual_for(&svc.id).flat_map(|m| &m.groups) {
                for (ip, conditions) in &group.addresses {
                    if published(*conditions) {
                        let slot = found.entry(*ip).or_default();
                        if let Some(hostname) = group.hostnames.get(ip) {
                            *slot = Some(hostname.clone());
                        }
                    }
                }
            }
        }
    }
    found
        .into_iter()
        .map(|(ip, hostname)| DnsEndpoint { ip, hostname })
        .collect()
}

/// Every Service's state and every error once `objects` are the whole set (for tests).
#[cfg(test)]
impl ControlPlane {
    pub fn compute_all(
        &mut self,
        objects: &[Object],
        now: SystemTime,
    ) -> (Vec<ServiceState>, Vec<ServiceError>) {
        self.replace_all(objects.iter().cloned());
        self.compute(now);
        (self.states().cloned().collect(), self.errors().collect())
    }
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
        .compute_all(&objects, SystemTime::UNIX_EPOCH);
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
    fn computing_what_is_listed_leaves_services_without_endpoints_for_later() {
        let slice = |service: &str, ip: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {service}-x, labels: {{kubernetes.io/service-name: {service}}}}}\naddressType: IPv4\nendpoints: [{{addresses: [{ip}]}}]\nports: [{{port: 8080}}]\n---\n"
            )
        };
        let api_service = |name: &str, ip: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: {ip}\n  ports: [{{port: 80, targetPort: 8080}}]\n---\n"
            )
        };
        let mut cp = ControlPlane::following_api_server();
        // "both" has its Service and its slice; "service" only its Service; "slice" only its
        // slice (its Service has not come yet).
        let yaml = api_service("both", "198.19.0.1")
            + &slice("both", "198.18.0.1")
            + &api_service("service", "198.19.0.2")
            + &slice("slice", "198.18.0.3");
        for object in objects(&yaml) {
            cp.apply(Change::Upsert(object));
        }
        let name = |n: &str| ObjectName {
            namespace: "default".into(),
            name: n.into(),
        };
        let ahead = cp.compute_listed(SystemTime::UNIX_EPOCH);
        let computed: Vec<&str> = ahead.iter().map(|c| c.name.name.as_str()).collect();
        assert_eq!(computed, ["both"]);
        assert_eq!(cp.state(&name("both")).unwrap().ports[0].serving().len(), 1);
        assert!(cp.state(&name("service")).is_none());

        // The rest of the lists: the waiting Services are computed with what came since.
        for object in
            objects(&(slice("service", "198.18.0.2") + &api_service("slice", "198.19.0.3")))
        {
            cp.apply(Change::Upsert(object));
        }
        let rest = cp.compute(SystemTime::UNIX_EPOCH);
        let mut computed: Vec<&str> = rest.iter().map(|c| c.name.name.as_str()).collect();
        computed.sort();
        assert_eq!(computed, ["service", "slice"]);
        for n in ["both", "service", "slice"] {
            let state = cp.state(&name(n)).unwrap();
            assert_eq!(state.ports[0].serving().len(), 1, "{n}");
        }
    }

    #[test]
    fn allocation_is_stable_unique_and_inside_the_cidr() {
        let yaml: String = (0..50).map(|i| svc(&format!("s{i}"), "")).collect();
        let objs = objects(&yaml);
        let (a, errors) = cp().compute_all(&objs, SystemTime::UNIX_EPOCH);
        assert!(errors.is_empty());
        let ips: BTreeSet<_> = a.iter().map(|s| s.cluster_ip.unwrap()).collect();
        assert_eq!(ips.len(), 50);
        assert!(ips.iter().all(|ip| cp().usable(*ip)));
        // A fresh control plane (agent restart) hands out the same addresses.
        let (b, _) = cp().compute_all(&objs, SystemTime::UNIX_EPOCH);
        assert_eq!(a, b);
    }

    #[test]
    fn fixed_ip_outside_cidr_or_taken_is_rejected_with_the_service_named() {
        let yaml = svc("a", "  clusterIP: 198.19.0.10\n")
            + &svc("b", "  clusterIP: 198.19.0.10\n")
            + &svc("c", "  clusterIP: 10.0.0.1\n");
        let (states, errors) = cp().compute_all(&objects(&yaml), SystemTime::UNIX_EPOCH);
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
        let (first, _) = cp.compute_all(&objects(&svc("old", "")), SystemTime::UNIX_EPOCH);
        let ip = first[0].cluster_ip.unwrap();
        let yaml = svc("old", "") + &svc("new", &format!("  clusterIP: {ip}\n"));
        let (states, errors) = cp.compute_all(&objects(&yaml), SystemTime::UNIX_EPOCH);
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
    fn after_a_restart_addresses_go_back_to_the_services_that_held_them() {
        // "zzz" holds an address; "aaa" (sorting first) asks for the same one; "mid" was
        // allocated an address that a fresh allocation would not give it now.
        let mut running = cp();
        let (first, _) = running.compute_all(&objects(&svc("zzz", "")), SystemTime::UNIX_EPOCH);
        let contested = first[0].cluster_ip.unwrap();
        let elsewhere: Ipv4Addr = "198.19.0.77".parse().unwrap();
        let yaml =
            svc("zzz", "") + &svc("aaa", &format!("  clusterIP: {contested}\n")) + &svc("mid", "");
        let name = |n: &str| ObjectName {
            namespace: "default".into(),
            name: n.into(),
        };
        let held = [
            (contested, name("zzz")),
            (elsewhere, name("mid")),
            ("198.19.0.99".parse().unwrap(), name("gone")),
        ];

        let mut restarted = cp();
        restarted.held_before(held.clone());
        let (states, errors) = restarted.compute_all(&objects(&yaml), SystemTime::UNIX_EPOCH);
        let ip_of = |n: &str| {
            states
                .iter()
                .find(|s| s.service.id.name == n)
                .and_then(|s| s.cluster_ip)
        };
        assert_eq!(
            ip_of("zzz"),
            Some(contested),
            "the running Service keeps its address"
        );
        assert_eq!(
            ip_of("mid"),
            Some(elsewhere),
            "an allocation stays where it was"
        );
        assert_eq!(ip_of("aaa"), None);
        assert_eq!(errors[0].service.name, "aaa");
        assert!(errors[0].error.message.contains("already allocated"));

        // Without the record (a first start) the newcomer, sorting first, would have won.
        let (fresh, _) = cp().compute_all(&objects(&yaml), SystemTime::UNIX_EPOCH);
        assert!(fresh.iter().any(|s| s.service.id.name == "aaa"));

        // A held address whose Service now asks for another one is released to it.
        let mut moved = cp();
        moved.held_before(held);
        let yaml = svc("zzz", "  clusterIP: 198.19.0.5\n")
            + &svc("aaa", &format!("  clusterIP: {contested}\n"));
        let (states, errors) = moved.compute_all(&objects(&yaml), SystemTime::UNIX_EPOCH);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(states.len(), 2);
    }

    #[test]
    fn rejected_update_keeps_the_accepted_version() {
        let mut cp = cp();
        cp.compute_all(
            &objects(&svc("a", "  clusterIP: 198.19.0.10\n")),
            SystemTime::UNIX_EPOCH,
        );
        let (states, errors) = cp.compute_all(
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
        let (states, errors) = cp().compute_all(&objects(&yaml), SystemTime::UNIX_EPOCH);
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
        let (states, _) = cp().compute_all(&objects(&yaml), SystemTime::UNIX_EPOCH);
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
    fn terminating_endpoints_serve_only_when_none_is_ready() {
        let deleting = "  deletionTimestamp: \"2026-01-01T00:00:00Z\"\n";
        let pod_with = |name: &str, ip: &str, meta: &str, status: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: web}}\n{meta}spec: {{containers: [{{name: c}}]}}\nstatus:\n  podIP: {ip}\n{status}---\n"
            )
        };
        let not_ready = "  conditions: [{type: Ready, status: \"False\"}]\n";
        let mut yaml = svc("web", "");
        yaml += &pod_with("ready", "198.18.1.1", "", "");
        yaml += &pod_with("going", "198.18.1.2", deleting, "");
        yaml += &pod_with("down", "198.18.1.3", "", not_ready);
        yaml += &pod_with("gone", "198.18.1.4", deleting, not_ready);
        let addrs = |v: &[SocketAddrV4]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let (states, _) = cp().compute_all(&objects(&yaml), SystemTime::UNIX_EPOCH);
        let p = &states[0].ports[0];
        assert_eq!(addrs(p.serving()), ["198.18.1.1:8080"]);
        assert_eq!(addrs(&p.terminating), ["198.18.1.2:8080"]);
        assert_eq!(
            addrs(&p.draining().collect::<Vec<_>>()),
            ["198.18.1.3:8080", "198.18.1.4:8080", "198.18.1.2:8080"]
        );

        // Without a ready endpoint, the serving-and-terminating one takes new connections.
        let yaml = yaml.replace(&pod_with("ready", "198.18.1.1", "", ""), "");
        let (states, _) = cp().compute_all(&objects(&yaml), SystemTime::UNIX_EPOCH);
        let p = &states[0].ports[0];
        assert_eq!(addrs(p.serving()), ["198.18.1.2:8080"]);
        assert_eq!(
            addrs(&p.draining().collect::<Vec<_>>()),
            ["198.18.1.3:8080", "198.18.1.4:8080"]
        );

        // publishNotReadyAddresses: every endpoint is ready.
        let yaml = yaml.replace("spec:\n", "spec:\n  publishNotReadyAddresses: true\n");
        let (states, _) = cp().compute_all(&objects(&yaml), SystemTime::UNIX_EPOCH);
        let p = &states[0].ports[0];
        assert_eq!(
            addrs(p.serving()),
            ["198.18.1.2:8080", "198.18.1.3:8080", "198.18.1.4:8080"]
        );
        assert_eq!(p.draining().count(), 0);
    }

    #[test]
    fn selectorless_service_uses_endpoints_and_slices_by_port_name() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec:\n  ports: [{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]\n---\n\
apiVersion: v1\nkind: Endpoints\nmetadata: {name: ext}\nsubsets:\n- addresses: [{ip: 198.18.9.1}]\n  ports: [{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}]\n---\n\
apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: ext-1, labels: {kubernetes.io/service-name: ext}}\naddressType: IPv4\nendpoints: [{addresses: [198.18.9.2]}]\nports: [{name: http, port: 8081}]\n";
        let (states, _) = cp().compute_all(&objects(yaml), SystemTime::UNIX_EPOCH);
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

    /// A random object of a small universe, so that changes keep hitting the same names,
    /// labels and addresses.
    fn random_object(next: &mut impl FnMut() -> u64) -> Object {
        let n = next();
        let yaml = match n % 4 {
            0 => {
                let cluster_ip = match next() % 4 {
                    0 => "  clusterIP: None\n".to_string(),
                    1 => format!("  clusterIP: 198.19.0.{}\n", 10 + next() % 2),
                    _ => String::new(),
                };
                let selector = match next() % 4 {
                    0 => String::new(),
                    1 => format!(
                        "  selector: {{app: a{}, tier: t{}}}\n",
                        next() % 3,
                        next() % 2
                    ),
                    _ => format!("  selector: {{app: a{}}}\n", next() % 3),
                };
                format!(
                    "apiVersion: v1\nkind: Service\nmetadata: {{name: s{}}}\nspec:\n{cluster_ip}{selector}  ports: [{{name: http, port: {}, targetPort: {}}}]\n",
                    next() % 8,
                    80 + next() % 2,
                    if next().is_multiple_of(2) {
                        "web".to_string()
                    } else {
                        "8080".to_string()
                    },
                )
            }
            1 | 2 => format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{}, labels: {{app: a{}, tier: t{}}}}}\nspec: {{containers: [{{name: c, ports: [{{name: web, containerPort: {}}}]}}]}}\nstatus: {{podIP: 198.18.1.{}, conditions: [{{type: Ready, status: \"{}\"}}]}}\n",
                next() % 10,
                next() % 3,
                next() % 2,
                9000 + next() % 2,
                1 + next() % 12,
                if next().is_multiple_of(3) {
                    "False"
                } else {
                    "True"
                },
            ),
            _ => format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: e{}, labels: {{kubernetes.io/service-name: s{}}}}}\naddressType: IPv4\nendpoints: [{{addresses: [198.18.2.{}]}}]\nports: [{{name: http, port: 8080}}]\n",
                next() % 4,
                next() % 8,
                1 + next() % 5,
            ),
        };
        objects(&yaml).remove(0)
    }

    /// Incremental computation gives what computing every Service again gives, after every
    /// step of a random sequence of upserts and deletes; the changes it reports are all the
    /// changes; the desired dataplane kept from them is the one built from scratch.
    #[test]
    fn incremental_equals_computing_everything_again() {
        let mut next = crate::test_random(0x9e37_79b9_7f4a_7c15u64);
        let (mut incremental, mut everything) = (cp(), cp());
        let mut reported: BTreeMap<ObjectName, ServiceState> = BTreeMap::new();
        let mut desired = crate::desired::DesiredDataplane::default();
        for step in 0..3000 {
            for _ in 0..1 + next() % 3 {
                let object = random_object(&mut next);
                let change = if next().is_multiple_of(4) {
                    Change::Delete(object.key())
                } else {
                    Change::Upsert(object)
                };
                incremental.apply(change.clone());
                everything.apply(change);
            }
            let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(step);
            let changes = incremental.compute(now);
            everything.dirty.extend(everything.services.keys().cloned());
            everything.dirty.extend(everything.states.keys().cloned());
            everything.compute(now);
            assert_eq!(incremental.states, everything.states, "step {step}");
            assert_eq!(incremental.rejected, everything.rejected, "step {step}");
            for change in &changes {
                assert_eq!(reported.get(&change.name), change.before.as_deref());
                match incremental.state(&change.name) {
                    Some(s) => reported.insert(change.name.clone(), s.clone()),
                    None => reported.remove(&change.name),
                };
            }
            assert_eq!(
                reported, incremental.states,
                "step {step}: a change went unreported"
            );
            desired.update(&incremental, &changes);
            assert_eq!(
                desired,
                crate::desired::DesiredDataplane::from_states(incremental.states()),
                "step {step}"
            );
        }
        // The universe was exercised: endpoints, rejections and removals all happened.
        assert!(incremental.states().any(|s| !s.ports[0].ready.is_empty()));
    }
}
