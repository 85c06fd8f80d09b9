use super::*;
use crate::controlplane::states_from_yaml;
use std::str::FromStr as _;

fn zone_of(yaml: &str) -> Zone {
    let mut zone = Zone::new(ZoneConfig {
        domain: Name::from_ascii("cluster.local.").unwrap(),
        ttl: 5,
    });
    for state in states_from_yaml(yaml) {
        zone.apply(&state.service.id.clone(), Some(&state));
    }
    zone
}

fn lower(name: &str) -> LowerName {
    LowerName::from_str(name).unwrap()
}

/// The answer to `name` `qtype` as zone-file lines; `None` for NXDOMAIN, `Elsewhere` panics.
fn ask(zone: &Zone, name: &str, qtype: RecordType) -> Option<Vec<String>> {
    match zone.lookup(&lower(name)) {
        Lookup::Name(records) => Some(records.answer(qtype).map(line).collect()),
        Lookup::NxDomain => None,
        Lookup::Elsewhere => panic!("{name} is not in the zone"),
    }
}

fn additionals(zone: &Zone, name: &str) -> Vec<String> {
    match zone.lookup(&lower(name)) {
        Lookup::Name(records) => records.additionals.iter().map(line).collect(),
        other => panic!("{name}: {other:?}"),
    }
}

fn line(record: &Record) -> String {
    format!(
        "{} {} {} {}",
        record.name,
        record.ttl,
        record.record_type(),
        record.data
    )
}

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 198.19.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: dns, port: 53, protocol: UDP}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: shop}
spec:
  clusterIP: 198.19.0.11
  ports: [{port: 9000, protocol: UDP}]
"#;

#[test]
fn a_cluster_ip_service_has_its_address_srv_per_named_port_and_ptr() {
    let zone = zone_of(WEB);
    let a = RecordType::A;
    assert_eq!(
        ask(&zone, "web.shop.svc.cluster.local.", a),
        Some(vec!["web.shop.svc.cluster.local. 5 A 198.19.0.10".into()])
    );
    // Names are case-insensitive.
    assert!(ask(&zone, "WEB.Shop.svc.cluster.local.", a).is_some_and(|r| r.len() == 1));
    assert_eq!(
        ask(
            &zone,
            "_http._tcp.web.shop.svc.cluster.local.",
            RecordType::SRV
        ),
        Some(vec![
            "_http._tcp.web.shop.svc.cluster.local. 5 SRV 0 100 80 web.shop.svc.cluster.local."
                .into()
        ])
    );
    assert_eq!(
        additionals(&zone, "_http._tcp.web.shop.svc.cluster.local."),
        vec!["web.shop.svc.cluster.local. 5 A 198.19.0.10".to_string()]
    );
    assert_eq!(
        ask(
            &zone,
            "_dns._udp.web.shop.svc.cluster.local.",
            RecordType::SRV
        )
        .unwrap()
        .len(),
        1
    );
    // The protocol is part of the name; unnamed ports have no SRV records.
    assert_eq!(
        ask(
            &zone,
            "_dns._tcp.web.shop.svc.cluster.local.",
            RecordType::SRV
        ),
        None
    );
    assert_eq!(
        ask(&zone, "_udp.plain.shop.svc.cluster.local.", RecordType::SRV),
        None
    );
    // Names that exist without the type asked: NODATA.
    for (name, qtype) in [
        ("web.shop.svc.cluster.local.", RecordType::AAAA),
        ("web.shop.svc.cluster.local.", RecordType::SRV),
        ("_tcp.web.shop.svc.cluster.local.", RecordType::A),
        ("shop.svc.cluster.local.", RecordType::A),
        ("svc.cluster.local.", RecordType::A),
    ] {
        assert_eq!(ask(&zone, name, qtype), Some(vec![]), "{name} {qtype}");
    }
    assert_eq!(ask(&zone, "other.svc.cluster.local.", a), None);
    assert_eq!(ask(&zone, "nope.shop.svc.cluster.local.", a), None);
    assert_eq!(
        ask(&zone, "10.0.19.198.in-addr.arpa.", RecordType::PTR),
        Some(vec![
            "10.0.19.198.in-addr.arpa. 5 PTR web.shop.svc.cluster.local.".into()
        ])
    );
    assert_eq!(
        zone.lookup(&lower("12.0.19.198.in-addr.arpa.")),
        Lookup::Elsewhere
    );
    assert_eq!(zone.lookup(&lower("example.com.")), Lookup::Elsewhere);
    assert_eq!(
        ask(&zone, "cluster.local.", RecordType::SOA).unwrap().len(),
        1
    );
    assert_eq!(
        ask(&zone, "dns-version.cluster.local.", RecordType::TXT),
        Some(vec!["dns-version.cluster.local. 5 TXT 1.1.0".into()])
    );
}

const HEADLESS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: db}
spec:
  clusterIP: None
  selector: {app: db}
  ports:
  - {name: sql, port: 5432, targetPort: 15432}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, labels: {app: db}}
spec: {hostname: db-0, subdomain: db, containers: [{name: c, image: i}]}
status: {podIP: 198.18.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, labels: {app: db}}
spec: {hostname: db-1, subdomain: other, containers: [{name: c, image: i}]}
status: {podIP: 198.18.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: db-2, labels: {app: db}}
spec: {containers: [{name: c, image: i}]}
status:
  podIP: 198.18.1.12
  conditions: [{type: Ready, status: "False"}]
"#;

#[test]
fn a_headless_service_has_its_ready_endpoints_with_their_hostnames() {
    let zone = zone_of(HEADLESS);
    let a = RecordType::A;
    let mut addresses = ask(&zone, "db.default.svc.cluster.local.", a).unwrap();
    addresses.sort();
    assert_eq!(
        addresses,
        vec![
            "db.default.svc.cluster.local. 5 A 198.18.1.10".to_string(),
            "db.default.svc.cluster.local. 5 A 198.18.1.11".to_string(),
        ]
    );
    // A hostname counts where the subdomain names the Service; other endpoints get their
    // address as name.
    assert_eq!(
        ask(&zone, "db-0.db.default.svc.cluster.local.", a),
        Some(vec![
            "db-0.db.default.svc.cluster.local. 5 A 198.18.1.10".into()
        ])
    );
    assert_eq!(ask(&zone, "db-1.db.default.svc.cluster.local.", a), None);
    assert!(ask(&zone, "198-18-1-11.db.default.svc.cluster.local.", a).is_some());
    // Not ready: not published.
    assert_eq!(
        ask(&zone, "198-18-1-12.db.default.svc.cluster.local.", a),
        None
    );
    let mut srv = ask(
        &zone,
        "_sql._tcp.db.default.svc.cluster.local.",
        RecordType::SRV,
    )
    .unwrap();
    srv.sort();
    assert_eq!(
        srv,
        vec![
            "_sql._tcp.db.default.svc.cluster.local. 5 SRV 0 50 15432 198-18-1-11.db.default.svc.cluster.local."
                .to_string(),
            "_sql._tcp.db.default.svc.cluster.local. 5 SRV 0 50 15432 db-0.db.default.svc.cluster.local."
                .to_string(),
        ]
    );
    assert_eq!(
        additionals(&zone, "_sql._tcp.db.default.svc.cluster.local.").len(),
        2
    );
    assert_eq!(
        ask(&zone, "10.1.18.198.in-addr.arpa.", RecordType::PTR),
        Some(vec![
            "10.1.18.198.in-addr.arpa. 5 PTR db-0.db.default.svc.cluster.local.".into()
        ])
    );

    // publishNotReadyAddresses: every endpoint.
    let zone = zone_of(&HEADLESS.replace(
        "clusterIP: None",
        "clusterIP: None\n  publishNotReadyAddresses: true",
    ));
    assert_eq!(
        ask(&zone, "db.default.svc.cluster.local.", a)
            .unwrap()
            .len(),
        3
    );
}

#[test]
fn a_headless_service_without_ports_or_endpoints_still_exists() {
    let zone = zone_of(
        r#"
apiVersion: v1
kind: Service
metadata: {name: raw}
spec: {clusterIP: None}
---
apiVersion: v1
kind: Endpoints
metadata: {name: raw}
subsets:
- addresses: [{ip: 198.18.2.1, hostname: first}, {ip: 198.18.2.2}]
---
apiVersion: v1
kind: Service
metadata: {name: empty}
spec: {clusterIP: None, selector: {app: none}}
"#,
    );
    assert_eq!(
        ask(&zone, "raw.default.svc.cluster.local.", RecordType::A)
            .unwrap()
            .len(),
        2
    );
    assert!(ask(&zone, "first.raw.default.svc.cluster.local.", RecordType::A).is_some());
    assert_eq!(
        ask(&zone, "empty.default.svc.cluster.local.", RecordType::A),
        Some(vec![])
    );
}

#[test]
fn an_external_name_is_an_alias_for_every_type() {
    let zone = zone_of(
        r#"
apiVersion: v1
kind: Service
metadata: {name: my-database}
spec: {type: ExternalName, externalName: my.database.example.com}
"#,
    );
    for qtype in [RecordType::A, RecordType::CNAME, RecordType::AAAA] {
        assert_eq!(
            ask(&zone, "my-database.default.svc.cluster.local.", qtype),
            Some(vec![
                "my-database.default.svc.cluster.local. 5 CNAME my.database.example.com.".into()
            ])
        );
    }
}

#[test]
fn pod_names_give_the_address_they_spell() {
    let zone = zone_of(WEB);
    assert_eq!(
        ask(&zone, "198-18-1-2.shop.pod.cluster.local.", RecordType::A),
        Some(vec![
            "198-18-1-2.shop.pod.cluster.local. 5 A 198.18.1.2".into()
        ])
    );
    assert_eq!(
        ask(&zone, "not-an-ip.shop.pod.cluster.local.", RecordType::A),
        None
    );
}

#[test]
fn a_service_removed_or_changed_takes_its_names_with_it() {
    let mut zone = zone_of(&format!("{WEB}\n---\n{HEADLESS}"));
    let web = ObjectName {
        namespace: "shop".into(),
        name: "web".into(),
    };
    // A second headless Service over the same Pods: the reverse names are shared.
    let twin = states_from_yaml(&HEADLESS.replace("name: db}", "name: db-twin}"))
        .into_iter()
        .find(|s| s.service.id.name == "db-twin")
        .unwrap();
    zone.apply(&twin.service.id.clone(), Some(&twin));
    assert_eq!(
        ask(&zone, "11.1.18.198.in-addr.arpa.", RecordType::PTR)
            .unwrap()
            .len(),
        2
    );
    let names = zone.names_len();
    zone.apply(&twin.service.id, None);
    assert_eq!(
        ask(&zone, "11.1.18.198.in-addr.arpa.", RecordType::PTR)
            .unwrap()
            .len(),
        1
    );
    assert!(zone.names_len() < names);
    zone.apply(&web, None);
    assert_eq!(
        ask(&zone, "web.shop.svc.cluster.local.", RecordType::A),
        None
    );
    let plain = ObjectName {
        namespace: "shop".into(),
        name: "plain".into(),
    };
    assert!(ask(&zone, "shop.svc.cluster.local.", RecordType::A).is_some());
    zone.apply(&plain, None);
    assert_eq!(ask(&zone, "shop.svc.cluster.local.", RecordType::A), None);
    assert_eq!(
        zone.lookup(&lower("10.0.19.198.in-addr.arpa.")),
        Lookup::Elsewhere
    );
    // Applying the same state twice leaves one copy.
    let db = states_from_yaml(HEADLESS).remove(0);
    zone.apply(&db.service.id.clone(), Some(&db));
    let names = zone.names_len();
    zone.apply(&db.service.id.clone(), Some(&db));
    assert_eq!(zone.names_len(), names);
}
