//! Traffic from outside the cluster, with real sockets: NodePort, LoadBalancer and externalIPs,
//! and the traffic policies, on two simulated nodes (node-1, index 0, and node-2, index 1)
//! and a host outside the cluster on their LAN. The pods serve on node-2 unless a test says
//! otherwise.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    time::Duration,
};

mod support;

use support::web::*;
use xtask::testbed::{OUTSIDE_IP, Testbed, lan_ip, wait_for};

/// Two nodes whose uplinks run XDP in the mode `LB_TEST_XDP_MODE` says (default native).
fn two_nodes() -> Testbed {
    let mut bed = support::bed::testbed(2);
    bed.for_xdp().unwrap();
    bed
}

/// Where the agents assign LoadBalancer addresses.
const LB_CIDR: &str = "198.18.200.0/24";
const EXTERNAL_IP: &str = "198.18.201.1";
const HTTP_NODE_PORT: u16 = 30080;

/// The `web` Service of `service_type`: TCP 80 -> 8080 on nodePort 30080, UDP 53 -> 5353 on
/// a nodePort the agents allocate.
fn external_service(service_type: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  type: {service_type}\n  clusterIP: {VIP}\n  selector: {{app: web}}\n{extra_spec}  ports:\n  - {{name: http, port: 80, targetPort: 8080, nodePort: {HTTP_NODE_PORT}}}\n  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}\n"
    )
}

/// The pod manifests of `web_pods`, with the node each runs on (`node-<index + 1>`).
fn place_pods(bed: &Testbed, names: &[(&str, u8)], node: usize) {
    for (name, i) in names {
        let manifest = pod_manifest(name, backend_ip(*i), "", "").replace(
            "spec:\n",
            &format!("spec:\n  nodeName: node-{}\n", node + 1),
        );
        bed.write_manifest(&format!("{name}.yaml"), &manifest)
            .unwrap();
    }
}

/// The answering pod's name, over HTTP from the host outside the cluster.
fn from_outside(bed: &Testbed, to: SocketAddrV4) -> std::io::Result<String> {
    let to = to.to_string();
    bed.in_outside(move || http_from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0), &to))
        .unwrap()
}

/// A UDP socket connected to `to` (it accepts datagrams from `to` only), reads waiting 2 s.
fn connected_udp(to: SocketAddrV4) -> UdpSocket {
    let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
    socket.connect(to).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    socket
}

/// The answers to `count` UDP datagrams sent from the outside host by a socket connected to
/// `to` (which accepts datagrams from `to` only).
fn udp_from_outside(bed: &Testbed, to: SocketAddrV4, count: usize) -> Vec<String> {
    bed.in_outside(move || {
        let socket = connected_udp(to);
        (0..count)
            .map(|i| {
                socket.send(format!("q{i}").as_bytes()).unwrap();
                let mut buf = [0u8; 512];
                let n = socket
                    .recv(&mut buf)
                    .expect("UDP answer from the address called");
                String::from_utf8_lossy(&buf[..n]).to_string()
            })
            .collect()
    })
    .unwrap()
}

/// A column of the `web` Service's line in `lb get svc` on `node`.
fn svc_column(bed: &Testbed, node: usize, column: &str) -> String {
    let table = bed.lb_on(node, &["get", "svc"]).unwrap();
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let index = header.iter().position(|h| *h == column).expect(column);
    let line = lines
        .find(|l| l.split_whitespace().nth(1) == Some("web") || l.starts_with("web "))
        .unwrap_or_else(|| panic!("web in {table}"));
    line.split_whitespace().nth(index).unwrap().to_string()
}

/// The nodePort `lb get svc` shows for `service_port`/`protocol`.
fn node_port(bed: &Testbed, node: usize, service_port: u16, protocol: &str) -> u16 {
    let ports = svc_column(bed, node, "PORT(S)");
    ports
        .split(',')
        .find_map(|p| {
            let (numbers, proto) = p.split_once('/')?;
            let (port, node_port) = numbers.split_once(':')?;
            (port == service_port.to_string() && proto == protocol)
                .then(|| node_port.parse().ok())
                .flatten()
        })
        .unwrap_or_else(|| panic!("{service_port}/{protocol} in {ports}"))
}

/// The peer addresses the `web` pods accepted connections from.
fn clients_seen(bed: &Testbed, pods: &[&str]) -> BTreeSet<Ipv4Addr> {
    pods.iter()
        .flat_map(|p| bed.accepted(p))
        .filter_map(|a| match a {
            SocketAddr::V4(a) => Some(*a.ip()),
            SocketAddr::V6(_) => None,
        })
        .collect()
}

#[test]
fn node_ports_answer_on_every_node_whichever_node_the_endpoints_are_on() {
    let mut bed = two_nodes();
    web_pods(&mut bed, 2, 1);
    bed.write_manifest("svc.yaml", &external_service("NodePort", ""))
        .unwrap();
    bed.start_agent().unwrap();

    let udp_port = node_port(&bed, 0, 53, "UDP");
    assert_eq!(
        node_port(&bed, 1, 53, "UDP"),
        udp_port,
        "both nodes allocate the same nodePort from the same manifests"
    );
    assert_eq!(node_port(&bed, 0, 80, "TCP"), HTTP_NODE_PORT);
    assert!((30000..=32767).contains(&udp_port));

    for node in [0, 1] {
        let answers: BTreeSet<String> = (0..12)
            .map(|_| {
                from_outside(&bed, SocketAddrV4::new(lan_ip(node), HTTP_NODE_PORT))
                    .expect("HTTP to a nodePort from outside")
            })
            .collect();
        assert_eq!(
            answers,
            ["web-1", "web-2"].map(String::from).into(),
            "node {node}: both pods serve"
        );
        let udp = udp_from_outside(&bed, SocketAddrV4::new(lan_ip(node), udp_port), 5);
        assert!(udp.iter().all(|a| a.starts_with("web-")), "{udp:?}");
    }
    // Through node-1 the flows went on to node-2 from node-1's address (the Cluster policy);
    // node-2 served its own pods with the client's address.
    assert_eq!(
        clients_seen(&bed, &["web-1", "web-2"]),
        [lan_ip(0), OUTSIDE_IP].into()
    );
    assert!(counter(&bed, 0, "snat_new") > 0);
    assert!(counter(&bed, 0, "fib_redirect") > 0);
    // XDP runs where asked: generic on veth, which cannot send XDP_TX frames natively.
    let xdp = match std::env::var("LB_TEST_XDP_MODE").as_deref() {
        Ok("off") => "eth0 off",
        _ => "eth0 generic",
    };
    assert!(
        bed.lb_on(0, &["status"])
            .unwrap()
            .contains(&format!("XDP: {xdp}")),
        "{xdp}"
    );
    assert_eq!(
        counter(&bed, 1, "snat_new"),
        0,
        "node-2's endpoints are local"
    );
}

#[test]
fn the_local_policy_keeps_the_client_address_and_a_node_without_endpoints_drops() {
    let mut bed = two_nodes();
    let (client, _) = web_pods(&mut bed, 2, 1);
    place_pods(&bed, &[("web-1", 1), ("web-2", 2)], 1);
    bed.write_manifest(
        "svc.yaml",
        &external_service("NodePort", "  externalTrafficPolicy: Local\n"),
    )
    .unwrap();
    bed.start_agent().unwrap();

    let at_node2 = SocketAddrV4::new(lan_ip(1), HTTP_NODE_PORT);
    for _ in 0..6 {
        from_outside(&bed, at_node2).expect("the node with endpoints serves");
    }
    assert_eq!(clients_seen(&bed, &["web-1", "web-2"]), [OUTSIDE_IP].into());

    let at_node1 = SocketAddrV4::new(lan_ip(0), HTTP_NODE_PORT);
    assert!(
        from_outside(&bed, at_node1).is_err(),
        "node-1 has no endpoint: dropped"
    );
    assert!(counter(&bed, 0, "drop_no_local_endpoint") > 0);

    // A pod calling a node's address is served by every endpoint, as at the ClusterIP.
    let to = format!("http://{}:{HTTP_NODE_PORT}/", lan_ip(0));
    assert!(curl(&bed, &client, &to).unwrap().starts_with("web-"));
}

#[test]
fn load_balancer_addresses_and_external_ips_answer_on_the_service_port() {
    let mut bed = two_nodes();
    let (client, _) = web_pods(&mut bed, 2, 1);
    bed.write_manifest(
        "svc.yaml",
        &external_service("LoadBalancer", &format!("  externalIPs: [{EXTERNAL_IP}]\n")),
    )
    .unwrap();
    bed.start_agent_with(&["--loadbalancer-cidr", LB_CIDR])
        .unwrap();

    let shown = svc_column(&bed, 0, "EXTERNAL-IP");
    assert_eq!(
        svc_column(&bed, 1, "EXTERNAL-IP"),
        shown,
        "the same on both nodes"
    );
    let lb_ip: Ipv4Addr = shown.split(',').next().unwrap().parse().unwrap();
    assert!(
        LB_CIDR.parse::<ipnet::Ipv4Net>().unwrap().contains(&lb_ip),
        "{shown}"
    );
    assert!(shown.contains(EXTERNAL_IP), "{shown}");
    // As a cloud load balancer or a BGP speaker would: the outside reaches them via node-1.
    for address in [lb_ip.to_string(), EXTERNAL_IP.to_string()] {
        bed.exec_outside(&[
            "ip",
            "route",
            "add",
            &address,
            "via",
            &lan_ip(0).to_string(),
        ])
        .unwrap();
    }
    let external_ip: Ipv4Addr = EXTERNAL_IP.parse().unwrap();
    for address in [lb_ip, external_ip] {
        let answer = from_outside(&bed, SocketAddrV4::new(address, 80))
            .unwrap_or_else(|e| panic!("HTTP to {address}:80 from outside: {e}"));
        assert!(answer.starts_with("web-"), "{answer}");
        let udp = udp_from_outside(&bed, SocketAddrV4::new(address, 53), 3);
        assert!(udp.iter().all(|a| a.starts_with("web-")), "{udp:?}");
    }
    // A pod calling the LoadBalancer address is served in the cluster.
    let answer = curl(&bed, &client, &format!("http://{lb_ip}/")).unwrap();
    assert!(answer.starts_with("web-"), "{answer}");
    // And on both nodes' nodePorts.
    for node in [0, 1] {
        let to = format!("http://{}:{HTTP_NODE_PORT}/", lan_ip(node));
        assert!(curl(&bed, &client, &to).unwrap().starts_with("web-"));
    }
}

#[test]
fn the_internal_local_policy_keeps_pods_on_their_node() {
    let mut bed = two_nodes();
    let (client, _) = web_pods(&mut bed, 2, 1);
    place_pods(&bed, &[("web-1", 1), ("web-2", 2)], 1);
    bed.write_manifest("svc.yaml", &web_service("  internalTrafficPolicy: Local\n"))
        .unwrap();
    bed.start_agent().unwrap();
    assert!(
        curl(&bed, &client, &format!("http://{VIP}/")).is_err(),
        "no endpoint on the client's node: refused"
    );

    let local = bed.add_pod_on(0, "web-3", backend_ip(3)).unwrap();
    bed.serve_http(&local, 8080).unwrap();
    place_pods(&bed, &[("web-3", 3)], 0);
    wait_for("the local pod to serve", Duration::from_secs(5), || {
        curl(&bed, &client, &format!("http://{VIP}/")).is_ok()
    });
    assert_eq!(spread(&bed, &client, 12), ["web-3".to_string()].into());
}

#[test]
fn load_balancer_source_ranges_drop_other_clients() {
    let mut bed = two_nodes();
    web_pods(&mut bed, 1, 1);
    let service = |ranges: &str| {
        external_service(
            "LoadBalancer",
            &format!("  loadBalancerIP: 198.18.200.7\n  loadBalancerSourceRanges: [{ranges}]\n"),
        )
    };
    bed.write_manifest("svc.yaml", &service(&format!("{OUTSIDE_IP}/32")))
        .unwrap();
    bed.start_agent_with(&["--loadbalancer-cidr", LB_CIDR])
        .unwrap();
    bed.exec_outside(&[
        "ip",
        "route",
        "add",
        "198.18.200.7",
        "via",
        &lan_ip(0).to_string(),
    ])
    .unwrap();
    let lb = SocketAddrV4::new(Ipv4Addr::new(198, 18, 200, 7), 80);
    assert_eq!(
        from_outside(&bed, lb).unwrap(),
        "web-1",
        "a client in the range"
    );

    bed.write_manifest("svc.yaml", &service("203.0.113.0/24, 198.51.100.0/24"))
        .unwrap();
    wait_for(
        "the client to be out of range",
        Duration::from_secs(5),
        || counter(&bed, 0, "drop_source_range") > 0 || from_outside(&bed, lb).is_err(),
    );
    assert!(from_outside(&bed, lb).is_err(), "out of range: dropped");
    assert!(counter(&bed, 0, "drop_source_range") > 0);
    // The nodePort is not a LoadBalancer address: no ranges there.
    let node_port = SocketAddrV4::new(lan_ip(0), HTTP_NODE_PORT);
    assert_eq!(from_outside(&bed, node_port).unwrap(), "web-1");
}

/// Status code and body of an HTTP GET from the outside host.
fn get_from_outside(bed: &Testbed, to: SocketAddrV4) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    bed.in_outside(move || {
        let mut stream = connect_from(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0), to.into())
            .expect("connect to the health check port");
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        let status = answer.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = answer
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        (status, body)
    })
    .unwrap()
}

#[test]
fn the_health_check_node_port_says_which_nodes_have_endpoints() {
    let mut bed = two_nodes();
    web_pods(&mut bed, 2, 1);
    place_pods(&bed, &[("web-1", 1), ("web-2", 2)], 1);
    bed.write_manifest(
        "svc.yaml",
        &external_service(
            "LoadBalancer",
            "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32000\n",
        ),
    )
    .unwrap();
    bed.start_agent_with(&["--loadbalancer-cidr", LB_CIDR])
        .unwrap();
    let check = |node| get_from_outside(&bed, SocketAddrV4::new(lan_ip(node), 32000));
    let mut with_endpoints = (0, String::new());
    wait_for("the health check port", Duration::from_secs(5), || {
        with_endpoints = check(1);
        with_endpoints.0 == 200
    });
    let body: serde_json::Value = serde_json::from_str(&with_endpoints.1).unwrap();
    assert_eq!(body["localEndpoints"], 2, "{body}");
    assert_eq!(body["service"]["name"], "web");
    assert_eq!(body["service"]["namespace"], "default");
    assert_eq!(body["serviceProxyHealthy"], true);
    let (status, body) = check(0);
    assert_eq!(status, 503, "node-1 has no endpoint: {body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["localEndpoints"], 0);

    // One pod goes: the count follows.
    bed.remove_manifest("web-2.yaml").unwrap();
    wait_for("the count to follow", Duration::from_secs(5), || {
        serde_json::from_str::<serde_json::Value>(&check(1).1).unwrap()["localEndpoints"] == 1
    });
}

/// The error a UDP datagram sent from the outside host by a socket connected to `to` meets,
/// if any, within 2 s.
fn udp_error_from_outside(bed: &Testbed, to: SocketAddrV4) -> Option<std::io::ErrorKind> {
    bed.in_outside(move || {
        let socket = connected_udp(to);
        socket.send(b"anyone?").unwrap();
        let mut buf = [0u8; 64];
        socket.recv(&mut buf).err().map(|e| e.kind())
    })
    .unwrap()
}

#[test]
fn a_closed_port_behind_a_node_port_is_refused_to_the_outside_client() {
    let mut bed = two_nodes();
    web_pods(&mut bed, 1, 1);
    // No pod listens on UDP 9999: the pod's port unreachable must reach the client as an
    // error about what it sent, to the address it called (through the node that
    // source-NATed the flow, or straight from the pod's node).
    bed.write_manifest(
        "closed.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: closed}\nspec:\n  type: NodePort\n  selector: {app: web}\n  ports:\n  - {port: 9, targetPort: 9999, nodePort: 30999, protocol: UDP}\n",
    )
    .unwrap();
    bed.start_agent().unwrap();
    for node in [0, 1] {
        assert_eq!(
            udp_error_from_outside(&bed, SocketAddrV4::new(lan_ip(node), 30999)),
            Some(std::io::ErrorKind::ConnectionRefused),
            "through node-{}",
            node + 1
        );
    }
}
