//! Cluster mode: the agent watches a stand-in API server (the real list/watch protocol over
//! HTTP, reached through a generated kubeconfig) instead of a manifest folder, and real
//! traffic goes through the ClusterIPs it programs from there.
mod support;

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use serde_json::{Value, json};
use support::apiserver::{FakeApiServer, Kind};
use xtask::testbed::{Pod, Testbed, wait_for};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const VIP: &str = "198.19.0.10";

fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, i)
}

fn service(name: &str, vip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default", "labels": labels},
        "spec": {"clusterIP": vip, "selector": {"app": name},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
    })
}

/// An endpoint: address, ready, serving, terminating.
type Endpoint = (Ipv4Addr, bool, bool, bool);

fn ready(ip: Ipv4Addr) -> Endpoint {
    (ip, true, true, false)
}

fn slice(service: &str, endpoints: &[Endpoint]) -> Value {
    let hints: Vec<Option<&str>> = vec![None; endpoints.len()];
    hinted_slice(service, endpoints, &hints)
}

/// An EndpointSlice whose endpoints carry the zone hints given (`None`: no hint).
fn hinted_slice(service: &str, endpoints: &[Endpoint], zones: &[Option<&str>]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{service}-abcde"), "namespace": "default",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "endpoints": endpoints.iter().zip(zones).map(|((ip, ready, serving, terminating), zone)| {
            let mut e = json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
            });
            if let Some(zone) = zone {
                e["hints"] = json!({"forZones": [{"name": zone}]});
            }
            e
        }).collect::<Vec<_>>(),
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
    })
}

fn node(zone: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": zone}}})
}

const API_ADDR: &str = "127.0.0.1:16443";

struct Cluster {
    bed: Testbed,
    api: FakeApiServer,
    client: Pod,
}

/// One node with a client and two web pods, and an API server in the node's namespace holding
/// the `web` Service with web-1 as its endpoint; the agent started in cluster mode.
fn cluster() -> Cluster {
    let mut bed = support::bed::testbed(1);
    let client = bed.add_pod_on(0, "client", CLIENT_IP).unwrap();
    for i in 1..=2 {
        let pod = bed
            .add_pod_on(0, &format!("web-{i}"), backend_ip(i))
            .unwrap();
        bed.serve_http(&pod, 8080).unwrap();
    }
    let listener = bed
        .listen_on_node(0, API_ADDR.parse::<SocketAddr>().unwrap())
        .unwrap();
    let api = FakeApiServer::start(listener);
    api.apply(node("zone-a"));
    api.apply(service("web", VIP, json!({})));
    api.apply(slice("web", &[ready(backend_ip(1))]));
    bed.kubeconfig = Some(api.write_kubeconfig(&bed.dir));
    bed.start_agent().unwrap();
    let cluster = Cluster { bed, api, client };
    cluster.answered_by("web-1", "the endpoint listed at start");
    cluster.check_attach_mode();
    cluster
}

impl Cluster {
    /// The programs sit where the attach mode says: as clsact filters with `legacy`, as TCX
    /// links (no clsact filter) otherwise.
    fn check_attach_mode(&self) {
        let legacy = std::env::var("LB_TEST_TC_ATTACH").is_ok_and(|m| m == "legacy");
        let link = &self.client.node_iface;
        for (direction, program) in [("ingress", "lb_tc_ingress"), ("egress", "lb_tc_egress")] {
            let filters = self
                .bed
                .exec_node(&["tc", "filter", "show", "dev", link, direction])
                .unwrap_or_default();
            assert_eq!(
                filters.contains(program),
                legacy,
                "{link} {direction} filters with --tc-attach {}:\n{filters}",
                if legacy { "legacy" } else { "auto" }
            );
        }
    }

    fn curl(&self, url: &str) -> anyhow::Result<String> {
        Ok(self
            .bed
            .curl(&self.client, url, Duration::from_secs(2))?
            .trim()
            .to_string())
    }

    /// Waits until the ClusterIP is answered by `pod`.
    fn answered_by(&self, pod: &str, what: &str) {
        wait_for(what, Duration::from_secs(20), || {
            self.curl(&format!("http://{VIP}/")).is_ok_and(|p| p == pod)
        });
    }

    /// The pods answering `n` new connections to the ClusterIP (a failure counts as
    /// "error").
    fn answering(&self, n: usize) -> std::collections::BTreeSet<String> {
        (0..n)
            .map(|_| {
                self.curl(&format!("http://{VIP}/"))
                    .unwrap_or_else(|_| "error".to_string())
            })
            .collect()
    }

    fn services(&self) -> Vec<String> {
        let json = self.bed.lb(&["get", "svc", "-A", "-o", "json"]).unwrap();
        let rows: Vec<Value> = serde_json::from_str(&json).unwrap();
        rows.iter()
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect()
    }
}

#[test]
fn services_and_endpoint_slices_from_the_api_server_reach_the_maps() {
    let c = cluster();
    // An endpoint change moves new connections; its EndpointSlice's trigger time feeds
    // kube-proxy's network programming latency.
    let mut changed = slice("web", &[ready(backend_ip(2))]);
    changed["metadata"]["annotations"] = json!({
        "endpoints.kubernetes.io/last-change-trigger-time":
            humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string()
    });
    c.api.apply(changed);
    c.answered_by("web-2", "the endpoint the slice now lists");
    let metrics = c
        .bed
        .exec_node(&["curl", "-sS", "http://127.0.0.1:10249/metrics"])
        .unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /metrics:\n{metrics}"))
    };
    assert!(value("kubeproxy_network_programming_duration_seconds_count") >= 1.0);
    assert!(value("kubeproxy_sync_proxy_rules_duration_seconds_count") >= 2.0);
    assert!(value("kubeproxy_sync_proxy_rules_endpoint_changes_total") >= 2.0);
    assert!(value("kubeproxy_sync_proxy_rules_service_changes_total") >= 1.0);
    assert!(value("kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 1.7e9);
    let entries = format!("lb_map_entries{{map=\"{}\"}}", lb_common::FRONTENDS_MAP);
    assert!(value(&entries) >= 1.0);
    let capacity = format!("lb_map_capacity{{map=\"{}\"}}", lb_common::CONNTRACK_MAP);
    assert!(value(&capacity) > 0.0);
    // Packets and bytes of the Service port, both ways (every curl above went through it).
    for family in ["lb_service_packets_total", "lb_service_bytes_total"] {
        for direction in ["in", "out"] {
            let labels = format!(
                "{{namespace=\"default\",service=\"web\",port=\"80\",port_name=\"http\",protocol=\"TCP\",address=\"{VIP}\",direction=\"{direction}\"}}"
            );
            assert!(
                value(&format!("{family}{labels}")) > 0.0,
                "{family}{labels}"
            );
        }
    }

    // Datapath events, switched on at run time: every new flow's backend in the agent's log.
    let switched = c.bed.lb(&["events", "flows"]).unwrap();
    assert_eq!(switched.trim(), "datapath events: flows");
    assert!(
        c.bed
            .lb(&["status"])
            .unwrap()
            .contains("datapath events: flows")
    );
    c.answered_by("web-2", "a flow with events on");
    let client = format!("TCP {CLIENT_IP}:");
    let to = format!(" -> {VIP}:80: backend {}:8080", backend_ip(2));
    wait_for("the new flow's event", Duration::from_secs(5), || {
        std::fs::read_to_string(c.bed.agent_log())
            .unwrap_or_default()
            .lines()
            .any(|l| l.contains("datapath: new flow: ") && l.contains(&client) && l.contains(&to))
    });
    assert_eq!(
        c.bed.lb(&["events", "off"]).unwrap().trim(),
        "datapath events: off"
    );
    assert!(
        c.bed.lb(&["events", "loud"]).is_err(),
        "an unknown level is refused"
    );
    // kube-proxy's health answer on its port.
    for path in ["healthz", "livez"] {
        let health = c
            .bed
            .exec_node(&[
                "curl",
                "-sS",
                "-f",
                &format!("http://127.0.0.1:10256/{path}"),
            ])
            .unwrap();
        let health: Value = serde_json::from_str(&health).unwrap();
        assert!(
            health["lastUpdated"]
                .as_str()
                .is_some_and(|t| !t.is_empty()),
            "{health}"
        );
        assert_eq!(health["nodeEligible"], true);
    }

    // Terminating but still serving: used as the fallback when no endpoint is ready.
    c.api.apply(slice(
        "web",
        &[
            (backend_ip(1), false, true, true),
            (backend_ip(2), false, false, true),
        ],
    ));
    c.answered_by("web-1", "the terminating endpoint that still serves");

    // Services that belong to another proxy, or are labelled headless, get nothing.
    c.api.apply(service(
        "other-proxy",
        "198.19.0.11",
        json!({"service.kubernetes.io/service-proxy-name": "someone-else"}),
    ));
    c.api.apply(slice("other-proxy", &[ready(backend_ip(1))]));
    c.api.apply(service(
        "labelled-headless",
        "198.19.0.12",
        json!({"service.kubernetes.io/headless": ""}),
    ));
    c.api
        .apply(slice("labelled-headless", &[ready(backend_ip(1))]));
    c.api.apply(service("plain", "198.19.0.13", json!({})));
    c.api.apply(slice("plain", &[ready(backend_ip(2))]));
    wait_for("the plain Service", Duration::from_secs(20), || {
        c.curl("http://198.19.0.13/").is_ok_and(|p| p == "web-2")
    });
    let listed = c.services();
    assert!(listed.contains(&"plain".to_string()), "{listed:?}");
    assert!(!listed.contains(&"other-proxy".to_string()), "{listed:?}");
    assert!(
        !listed.contains(&"labelled-headless".to_string()),
        "{listed:?}"
    );
    for vip in ["198.19.0.11", "198.19.0.12"] {
        assert!(
            c.curl(&format!("http://{vip}/")).is_err(),
            "{vip} is not this proxy's"
        );
    }
    // Labelling a proxied Service away removes it.
    c.api.apply(service(
        "plain",
        "198.19.0.13",
        json!({"service.kubernetes.io/service-proxy-name": "someone-else"}),
    ));
    wait_for(
        "the relabelled Service gone",
        Duration::from_secs(20),
        || !c.services().contains(&"plain".to_string()),
    );

    // Deleting the Service removes it from the datapath.
    c.api.delete(Kind::EndpointSlice, "default", "web-abcde");
    c.api.delete(Kind::Service, "default", "web");
    wait_for("the deleted Service gone", Duration::from_secs(20), || {
        !c.services().contains(&"web".to_string()) && c.curl(&format!("http://{VIP}/")).is_err()
    });

    // `lb reset` takes every program off the links, through whichever attach mode was used,
    // and the clsact qdisc the legacy path added.
    let mut c = c;
    c.bed.stop_agent(false).unwrap();
    let lb = support::bed::lb().to_string_lossy().into_owned();
    let bpffs = c.bed.bpffs.to_string_lossy().into_owned();
    // nsenter, not `ip netns exec`: that one mounts a /sys of its own, without bpffs.
    let said = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", c.bed.node_netns))
        .args([lb.as_str(), "reset", "--bpffs", bpffs.as_str()])
        .output()
        .unwrap();
    assert!(said.status.success(), "lb reset: {said:?}");
    let said = String::from_utf8_lossy(&said.stdout);
    let link = c.client.node_iface.clone();
    for direction in ["ingress", "egress"] {
        let filters = c
            .bed
            .exec_node(&["tc", "filter", "show", "dev", &link, direction])
            .unwrap();
        assert!(!filters.contains("lb_tc_"), "{link} {direction}: {filters}");
    }
    let qdiscs = c
        .bed
        .exec_node(&["tc", "qdisc", "show", "dev", &link])
        .unwrap();
    assert!(!qdiscs.contains("clsact"), "{link}: {qdiscs}");
    let left: Vec<_> = std::fs::read_dir(&bpffs)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(
        !std::path::Path::new(&bpffs).exists(),
        "{bpffs} removed; left: {left:?}; reset said: {said}"
    );
}

#[test]
fn maps_changed_behind_the_agents_back_are_mended_at_the_next_resync() {
    use aya::maps::{HashMap as BpfHashMap, Map, MapData};
    use lb_common::{FRONTENDS_MAP, Frontend, FrontendKey, PROTO_TCP, SCOPE_CLUSTER, net_port};

    let mut c = cluster();
    c.bed.stop_agent(false).unwrap();
    c.bed.start_agent_with(&["--sync-period=1s"]).unwrap();
    c.answered_by("web-1", "the restarted agent");
    let pin = c.bed.bpffs_of(0).join(FRONTENDS_MAP);
    let mut frontends: BpfHashMap<MapData, FrontendKey, Frontend> =
        BpfHashMap::try_from(Map::HashMap(MapData::from_pin(&pin).unwrap())).unwrap();
    let key = |vip: &str| FrontendKey {
        addr: vip.parse::<Ipv4Addr>().unwrap().octets(),
        port: net_port(80),
        protocol: PROTO_TCP,
        scope: SCOPE_CLUSTER,
    };
    // Resyncs that find the maps as the agent wrote them plan nothing again.
    std::thread::sleep(Duration::from_millis(2500));
    let drift = "not as this agent wrote them";
    let log = std::fs::read_to_string(c.bed.agent_log()).unwrap();
    assert!(
        !log.contains(drift),
        "no drift before the maps were touched:\n{log}"
    );

    // The Service's frontend deleted, and a frontend no Service has added.
    let web = frontends.get(&key(VIP), 0).unwrap();
    frontends.remove(&key(VIP)).unwrap();
    frontends.insert(key("198.19.0.99"), web, 0).unwrap();
    c.answered_by("web-1", "the frontend mended by a resync");
    wait_for(
        "the orphan frontend removed",
        Duration::from_secs(5),
        || frontends.get(&key("198.19.0.99"), 0).is_err(),
    );
    let log = std::fs::read_to_string(c.bed.agent_log()).unwrap();
    assert!(log.contains(drift), "the drift was logged:\n{log}");
}

#[test]
fn broken_and_expired_watches_and_an_api_outage_keep_the_datapath_serving() {
    let mut c = cluster();
    let reopen = |c: &Cluster| {
        c.bed
            .listen_on_node(0, API_ADDR.parse::<SocketAddr>().unwrap())
            .unwrap()
    };
    // Dropped watch connections are resumed.
    c.api.cut_watches();
    c.api.apply(slice("web", &[ready(backend_ip(2))]));
    c.answered_by("web-2", "a change after the watches were cut");

    // The API server goes away; the datapath keeps serving. Meanwhile an endpoint changes and
    // the history is compacted, so the agent's watches come back to 410 Gone and must relist:
    // the change arrives, and nothing was flushed on the way.
    c.api.down();
    for _ in 0..10 {
        assert_eq!(c.curl(&format!("http://{VIP}/")).unwrap(), "web-2");
    }
    c.api.apply(slice("web", &[ready(backend_ip(1))]));
    c.api.compact();
    c.api.up(reopen(&c));
    c.answered_by("web-1", "the change made during the outage, after a relist");
    let log = std::fs::read_to_string(c.bed.agent_log()).unwrap();
    assert!(
        log.contains("too old resource version"),
        "the watches expired and were relisted:\n{log}"
    );

    // An agent restarted while the API server is down serves from the pinned maps, then
    // catches up.
    c.bed.stop_agent(false).unwrap();
    c.api.down();
    c.bed.start_agent().unwrap();
    for _ in 0..10 {
        assert_eq!(c.curl(&format!("http://{VIP}/")).unwrap(), "web-1");
    }
    c.api.apply(slice("web", &[ready(backend_ip(2))]));
    c.api.up(reopen(&c));
    c.answered_by("web-2", "the change made while the agent was restarting");
}

#[test]
fn topology_hints_keep_new_connections_in_this_nodes_zone() {
    let c = cluster();
    let both = [ready(backend_ip(1)), ready(backend_ip(2))];
    let both_pods: std::collections::BTreeSet<String> =
        ["web-1".to_string(), "web-2".to_string()].into();
    c.api.apply(slice("web", &both));
    wait_for(
        "both endpoints without hints",
        Duration::from_secs(20),
        || c.answering(24) == both_pods,
    );
    // web-1 is meant for zone-a (this node's), web-2 for zone-b.
    c.api.apply(hinted_slice(
        "web",
        &both,
        &[Some("zone-a"), Some("zone-b")],
    ));
    wait_for("only zone-a's endpoint", Duration::from_secs(20), || {
        c.answering(12) == ["web-1".to_string()].into()
    });
    // The node moves to zone-b.
    c.api.apply(node("zone-b"));
    c.answered_by("web-2", "zone-b's endpoint after the node's zone changed");
    for _ in 0..12 {
        assert_eq!(c.curl(&format!("http://{VIP}/")).unwrap(), "web-2");
    }
    // An endpoint without hints: the hints are ignored and both take connections.
    c.api
        .apply(hinted_slice("web", &both, &[Some("zone-a"), None]));
    wait_for("both endpoints again", Duration::from_secs(20), || {
        c.answering(24) == both_pods
    });
    // No endpoint meant for this node's zone: every endpoint takes connections.
    c.api.apply(hinted_slice(
        "web",
        &both,
        &[Some("zone-a"), Some("zone-a")],
    ));
    wait_for(
        "both endpoints when none is meant for zone-b",
        Duration::from_secs(20),
        || c.answering(24) == both_pods,
    );
}
