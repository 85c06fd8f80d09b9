//! The cluster zone of Kubernetes' DNS-based service discovery specification, built from the
//! same Service states the datapath is written from and kept up to date one Service at a time.
//! Pure: the server reads it, the agent writes it.
use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use hickory_server::proto::rr::{
    LowerName, Name, RData, Record, RecordType,
    rdata::{A, CNAME, PTR, SOA, SRV, TXT},
};

use crate::{
    controlplane::{DnsEndpoint, ServiceState},
    model::{ObjectName, ServiceType},
};

/// The specification's version, served as `dns-version.<domain>` TXT.
const SPEC_VERSION: &str = "1.1.0";

/// The records of one name of the zone, and the address records of the names its SRV
/// records point to (for the additional section).
#[derive(Debug, Default, PartialEq)]
pub struct NameRecords {
    pub records: Vec<Record>,
    pub additionals: Vec<Record>,
}

impl NameRecords {
    /// What a query of `qtype` for this name gets: the records of that type, or the name's
    /// CNAME (an alias answers for every type). None: the name exists without such records.
    pub fn answer(&self, qtype: RecordType) -> impl Iterator<Item = &Record> + Send {
        let alias = self
            .records
            .iter()
            .any(|r| r.record_type() == RecordType::CNAME);
        self.records.iter().filter(move |r| {
            qtype == RecordType::ANY
                || r.record_type() == qtype
                || (alias && r.record_type() == RecordType::CNAME)
        })
    }

    /// The CNAME target, for an alias.
    pub fn alias(&self) -> Option<&Name> {
        self.records.iter().find_map(|r| match &r.data {
            RData::CNAME(CNAME(target)) => Some(target),
            _ => None,
        })
    }
}

/// What the zone says about a name.
#[derive(Debug, PartialEq)]
pub enum Lookup {
    /// A name of the zone, with its records (maybe none of the type asked: NODATA).
    Name(Arc<NameRecords>),
    /// Inside the cluster domain, but no such name (NXDOMAIN).
    NxDomain,
    /// Neither in the cluster domain nor a reverse name of a Service or endpoint address.
    Elsewhere,
}

/// The zone: `<domain>` and the reverse names of Service and headless endpoint addresses.
pub struct Zone {
    domain: Name,
    domain_lower: LowerName,
    services_lower: LowerName,
    pods_lower: LowerName,
    ttl: u32,
    apex: Arc<NameRecords>,
    version: Arc<NameRecords>,
    empty: Arc<NameRecords>,
    /// Every name a Service gives, including the empty non-terminals between them
    /// (`_tcp.<service>...`).
    names: HashMap<LowerName, Arc<NameRecords>>,
    /// The names each Service gave.
    by_service: HashMap<ObjectName, Vec<LowerName>>,
    /// Reverse names: several Services can publish one address (a Pod behind two headless
    /// Services), so each name's PTR records are kept by Service and merged.
    reverse: HashMap<LowerName, BTreeMap<ObjectName, Vec<Record>>>,
    reverse_merged: HashMap<LowerName, Arc<NameRecords>>,
    reverse_by_service: HashMap<ObjectName, Vec<LowerName>>,
    /// Services per namespace: `<namespace>.svc.<domain>` exists while it has one.
    namespaces: HashMap<String, usize>,
    /// Whether the agent has computed its Services once: until then the zone knows nothing
    /// and the server answers SERVFAIL rather than NXDOMAIN.
    ready: bool,
}

/// The zone's parameters.
#[derive(Clone, Debug)]
pub struct ZoneConfig {
    /// The cluster domain, e.g. `cluster.local.`
    pub domain: Name,
    /// TTL of every record, and of negative answers.
    pub ttl: u32,
}

impl Zone {
    pub fn new(config: ZoneConfig) -> Self {
        let mut domain = config.domain.clone();
        domain.set_fqdn(true);
        let child = |label: &str| {
            Name::from_labels([label.as_bytes()])
                .and_then(|n| n.append_domain(&domain))
                .expect("a label under the cluster domain")
        };
        let soa = Record::from_rdata(
            domain.clone(),
            config.ttl,
            RData::SOA(SOA::new(
                Name::from_labels(["ns".as_bytes(), b"dns"])
                    .and_then(|n| n.append_domain(&domain))
                    .expect("a name under the cluster domain"),
                child("hostmaster"),
                1,
                7200,
                1800,
                86400,
                config.ttl,
            )),
        );
        let version = Record::from_rdata(
            child("dns-version"),
            config.ttl,
            RData::TXT(TXT::new(vec![SPEC_VERSION.to_string()])),
        );
        Self {
            domain_lower: LowerName::new(&domain),
            services_lower: LowerName::new(&child("svc")),
            pods_lower: LowerName::new(&child("pod")),
            domain,
            ttl: config.ttl,
            apex: Arc::new(NameRecords {
                records: vec![soa],
                additionals: Vec::new(),
            }),
            version: Arc::new(NameRecords {
                records: vec![version],
                additionals: Vec::new(),
            }),
            empty: Arc::default(),
            names: HashMap::new(),
            by_service: HashMap::new(),
            reverse: HashMap::new(),
            reverse_merged: HashMap::new(),
            reverse_by_service: HashMap::new(),
            namespaces: HashMap::new(),
            ready: false,
        }
    }

    pub fn domain(&self) -> &Name {
        &self.domain
    }

    /// The apex's records (its SOA), for the authority section of negative answers.
    pub fn apex(&self) -> Arc<NameRecords> {
        self.apex.clone()
    }

    pub fn ready(&self) -> bool {
        self.ready
    }

    /// Marks the zone complete: the agent has computed every Service once.
    pub fn set_ready(&mut self) {
        self.ready = true;
    }

    /// How many names the Services give (for tests and status).
    pub fn names_len(&self) -> usize {
        self.names.len() + self.reverse_merged.len()
    }

    /// Replaces what `service` publishes with what `state` gives (nothing when `None`).
    pub fn apply(&mut self, service: &ObjectName, state: Option<&ServiceState>) {
        let records = state.and_then(|s| self.records(s));
        self.replace(service, records);
    }

    /// Replaces what `service` publishes with `records` (made by [`Self::records`]).
    pub fn replace(&mut self, service: &ObjectName, records: Option<ServiceRecords>) {
        self.remove(service);
        let Some(published) = records else { return };
        *self
            .namespaces
            .entry(service.namespace.clone())
            .or_default() += 1;
        let mut owned = Vec::with_capacity(published.names.len());
        for (name, records) in published.names {
            self.names.insert(name.clone(), Arc::new(records));
            owned.push(name);
        }
        self.by_service.insert(service.clone(), owned);
        let mut reverse_owned: BTreeMap<LowerName, Vec<Record>> = BTreeMap::new();
        for (name, record) in published.reverse {
            reverse_owned.entry(name).or_default().push(record);
        }
        let names: Vec<LowerName> = reverse_owned.keys().cloned().collect();
        for (name, records) in reverse_owned {
            self.reverse
                .entry(name.clone())
                .or_default()
                .insert(service.clone(), records);
            self.merge_reverse(&name);
        }
        self.reverse_by_service.insert(service.clone(), names);
    }

    fn remove(&mut self, service: &ObjectName) {
        if let Some(names) = self.by_service.remove(service) {
            for name in names {
                self.names.remove(&name);
            }
            if let Some(count) = self.namespaces.get_mut(&service.namespace) {
                *count -= 1;
                if *count == 0 {
                    self.namespaces.remove(&service.namespace);
                }
            }
        }
        for name in self.reverse_by_service.remove(service).unwrap_or_default() {
            if let Some(by_service) = self.reverse.get_mut(&name) {
                by_service.remove(service);
                if by_service.is_empty() {
                    self.reverse.remove(&name);
                }
            }
            self.merge_reverse(&name);
        }
    }

    fn merge_reverse(&mut self, name: &LowerName) {
        match self.reverse.get(name) {
            Some(by_service) => {
                let mut records: Vec<Record> = by_service.values().flatten().cloned().collect();
                records.dedup();
                self.reverse_merged.insert(
                    name.clone(),
                    Arc::new(NameRecords {
                        records,
                        additionals: Vec::new(),
                    }),
                );
            }
            None => {
                self.reverse_merged.remove(name);
            }
        }
    }

    /// What the zone holds for `name`.
    pub fn lookup(&self, name: &LowerName) -> Lookup {
        if let Some(records) = self.names.get(name) {
            return Lookup::Name(records.clone());
        }
        if let Some(records) = self.reverse_merged.get(name) {
            return Lookup::Name(records.clone());
        }
        if !self.domain_lower.zone_of(name) {
            return Lookup::Elsewhere;
        }
        if *name == self.domain_lower {
            return Lookup::Name(self.apex.clone());
        }
        if *name == self.services_lower || *name == self.pods_lower {
            return Lookup::Name(self.empty.clone());
        }
        if name.base_name() == self.services_lower
            && first_label(name).is_some_and(|ns| self.namespaces.contains_key(ns.as_str()))
        {
            return Lookup::Name(self.empty.clone());
        }
        if self.version.records[0].name == Name::from(name) {
            return Lookup::Name(self.version.clone());
        }
        if let Some(records) = self.pod_name(name) {
            return Lookup::Name(records);
        }
        Lookup::NxDomain
    }

    /// `<a-b-c-d>.<namespace>.pod.<domain>` -> a.b.c.d, for any namespace (CoreDNS's
    /// `pods insecure`, its default); `<namespace>.pod.<domain>` exists for every namespace
    /// that has a Service.
    fn pod_name(&self, name: &LowerName) -> Option<Arc<NameRecords>> {
        let parent = name.base_name();
        if parent == self.pods_lower {
            return first_label(name)
                .filter(|ns| self.namespaces.contains_key(ns.as_str()))
                .map(|_| self.empty.clone());
        }
        if parent.base_name() != self.pods_lower {
            return None;
        }
        let ip = first_label(name)?
            .replace('-', ".")
            .parse::<Ipv4Addr>()
            .ok()?;
        Some(Arc::new(NameRecords {
            records: vec![Record::from_rdata(
                Name::from(name),
                self.ttl,
                RData::A(A(ip)),
            )],
            additionals: Vec::new(),
        }))
    }

    /// Every record a Service gives, or `None` when its names cannot be written as DNS names.
    /// Reads only the zone's settings: made under a read lock, put in under a write lock.
    pub fn records(&self, state: &ServiceState) -> Option<ServiceRecords> {
        let svc = &state.service;
        let base = Name::from_labels([svc.id.name.as_bytes(), svc.id.namespace.as_bytes()])
            .ok()?
            .append_domain(&Name::from(&self.services_lower))
            .ok()?;
        let mut out = ServiceRecords::default();
        let ttl = self.ttl;
        let record = |name: &Name, data: RData| Record::from_rdata(name.clone(), ttl, data);
        if svc.service_type == ServiceType::ExternalName {
            let mut target = Name::from_ascii(svc.external_name.as_deref()?).ok()?;
            target.set_fqdn(true);
            out.add(&base, record(&base, RData::CNAME(CNAME(target))));
            return Some(out);
        }
        let named_ports = state.ports.iter().filter(|p| !p.port.name.is_empty());
        match state.cluster_ip {
            Some(ip) => {
                let address = record(&base, RData::A(A(ip)));
                out.add(&base, address.clone());
                out.reverse(ip, record(&reverse_name(ip), RData::PTR(PTR(base.clone()))));
                for port in named_ports {
                    let Some(srv_name) = srv_name(&port.port.name, port.port.protocol, &base)
                    else {
                        continue;
                    };
                    out.add(
                        &srv_name,
                        record(
                            &srv_name,
                            RData::SRV(SRV::new(0, 100, port.port.port, base.clone())),
                        ),
                    );
                    out.additional(&srv_name, address.clone());
                }
            }
            None => {
                let mut hosts: BTreeMap<Ipv4Addr, Name> = BTreeMap::new();
                for endpoint in &state.dns_endpoints {
                    let host = endpoint_host(endpoint, &base)?;
                    let address = RData::A(A(endpoint.ip));
                    out.add(&base, record(&base, address.clone()));
                    out.add(&host, record(&host, address));
                    out.reverse(
                        endpoint.ip,
                        record(&reverse_name(endpoint.ip), RData::PTR(PTR(host.clone()))),
                    );
                    hosts.insert(endpoint.ip, host);
                }
                for port in named_ports {
                    let Some(srv_name) = srv_name(&port.port.name, port.port.protocol, &base)
                    else {
                        continue;
                    };
                    let mut targets: Vec<(&Name, Ipv4Addr, u16)> = port
                        .ready
                        .iter()
                        .chain(&port.terminating)
                        .chain(&port.not_ready)
                        .filter_map(|a| Some((hosts.get(a.ip())?, *a.ip(), a.port())))
                        .collect();
                    targets.sort();
                    targets.dedup();
                    let weight = (100 / targets.len().max(1)).max(1) as u16;
                    for (host, ip, port) in targets {
                        out.add(
                            &srv_name,
                            record(
                                &srv_name,
                                RData::SRV(SRV::new(0, weight, port, host.clone())),
                            ),
                        );
                        out.additional(&srv_name, record(host, RData::A(A(ip))));
                    }
                }
                // A headless Service without ready endpoints still exists (NODATA).
                out.names.entry(LowerName::new(&base)).or_default();
            }
        }
        Some(out)
    }
}

/// What one Service publishes.
#[derive(Default)]
pub struct ServiceRecords {
    names: BTreeMap<LowerName, NameRecords>,
    reverse: Vec<(LowerName, Record)>,
}

impl ServiceRecords {
    fn add(&mut self, name: &Name, record: Record) {
        let entry = self.names.entry(LowerName::new(name)).or_default();
        if !entry.records.contains(&record) {
            entry.records.push(record);
        }
        // The names between an SRV name and its Service exist too (`_tcp.<service>...`).
        if name.iter().next().is_some_and(|l| l.starts_with(b"_")) {
            self.names
                .entry(LowerName::new(&name.base_name()))
                .or_default();
        }
    }

    fn additional(&mut self, name: &Name, record: Record) {
        let entry = self.names.entry(LowerName::new(name)).or_default();
        if !entry.additionals.contains(&record) {
            entry.additionals.push(record);
        }
    }

    fn reverse(&mut self, ip: Ipv4Addr, record: Record) {
        self.reverse
            .push((LowerName::new(&reverse_name(ip)), record));
    }
}

/// `_<port>._<protocol>.<service>...`
fn srv_name(port: &str, protocol: crate::model::Protocol, base: &Name) -> Option<Name> {
    let port = format!("_{port}");
    let protocol = format!("_{}", protocol.as_str().to_ascii_lowercase());
    Name::from_labels([port.as_bytes(), protocol.as_bytes()])
        .ok()?
        .append_domain(base)
        .ok()
}

/// `<hostname>.<service>...`, or `<a-b-c-d>.<service>...` for an endpoint without a hostname
/// (or with one that is not a DNS label), as CoreDNS names it.
fn endpoint_host(endpoint: &DnsEndpoint, base: &Name) -> Option<Name> {
    let label = match &endpoint.hostname {
        Some(hostname) if is_dns_label(hostname) => hostname.clone(),
        _ => endpoint.ip.to_string().replace('.', "-"),
    };
    Name::from_labels([label.as_bytes()])
        .ok()?
        .append_domain(base)
        .ok()
}

/// An RFC 1123 label, as Kubernetes validates hostnames.
fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// `d.c.b.a.in-addr.arpa.`
pub fn reverse_name(ip: Ipv4Addr) -> Name {
    let [a, b, c, d] = ip.octets();
    Name::from_ascii(format!("{d}.{c}.{b}.{a}.in-addr.arpa."))
        .expect("a reverse name is a valid name")
}

fn first_label(name: &LowerName) -> Option<String> {
    Name::from(name)
        .iter()
        .next()
        .map(|l| String::from_utf8_lossy(l).into_owned())
}

#[cfg(test)]
mod tests;
