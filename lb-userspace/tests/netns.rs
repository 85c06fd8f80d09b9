//! Whole behaviour on a simulated node: real sockets from a client pod through a ClusterIP to
//! server pods, with `lb agent` running in the node namespace.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

mod support;

use xtask::testbed::{Pod, Testbed, wait_for};

fn testbed() -> Testbed {
    support::bed::testbed(1)
}

fn pod_manifest(name: &str, app: &str, ip: Ipv4Addr, ports: &[(&str, u16)]) -> String {
    let ports: String = ports
        .iter()
        .map(|(n, p)| format!("    - {{name: {n}, containerPort: {p}}}\n"))
        .collect();
    let ports = if ports.is_empty() {
        String::new()
    } else {
        format!("    ports:\n{ports}")
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: {app}}}\nspec:\n  containers:\n  - name: server\n    image: example\n{ports}status:\n  podIP: {ip}\n"
    )
}

fn service_manifest(name: &str, app: &str, cluster_ip: &str, ports: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: {cluster_ip}\n  selector: {{app: {app}}}\n  ports:\n{ports}"
    )
}

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);

fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, i)
}

/// Adds a client pod and `n` HTTP server pods `web-<i>` on port 8080 with their manifests.
fn web_pods(bed: &mut Testbed, n: u8) -> Pod {
    let client = bed.add_pod("client", CLIENT_IP).unwrap();
    for i in 1..=n {
        let name = format!("web-{i}");
        let pod = bed.add_pod(&name, backend_ip(i)).unwrap();
        bed.serve_http(&pod, 8080).unwrap();
        bed.write_manifest(
            &format!("{name}.yaml"),
            &pod_manifest(&name, "web", backend_ip(i), &[("http", 8080)]),
        )
        .unwrap();
    }
    client
}

/// The `web` Service: 198.19.0.10:80 to the `web` pods' `target_port`.
fn write_web_service(bed: &Testbed, target_port: u32) {
    let ports = format!("  - {{port: 80, targetPort: {target_port}}}\n");
    bed.write_manifest(
        "svc.yaml",
        &service_manifest("web", "web", "198.19.0.10", &ports),
    )
    .unwrap();
}

/// Pod names answering `url` over `count` new connections.
fn spread(bed: &Testbed, client: &Pod, url: &str, count: usize) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for _ in 0..count {
        let body = bed
            .curl(client, url, Duration::from_secs(2))
            .expect("curl through the ClusterIP");
        *seen.entry(body.trim().to_string()).or_insert(0) += 1;
    }
    seen
}

#[test]
fn every_backend_is_reached_through_the_cluster_ip() {
    let mut bed = testbed();
    let client = web_pods(&mut bed, 3);
    write_web_service(&bed, 8080);
    bed.start_agent().unwrap();

    let seen = spread(&bed, &client, "http://198.19.0.10/", 60);
    assert_eq!(
        seen.keys().cloned().collect::<Vec<_>>(),
        ["web-1", "web-2", "web-3"],
        "{seen:?}"
    );

    let svc = bed.lb(&["get", "svc"]).unwrap();
    let row: Vec<&str> = svc
        .lines()
        .find(|l| l.starts_with("web "))
        .expect(&svc)
        .split_whitespace()
        .collect();
    assert_eq!(
        row[..5],
        ["web", "ClusterIP", "198.19.0.10", "<none>", "80/TCP"]
    );
    let ep = bed.lb(&["get", "ep"]).unwrap();
    assert!(
        ep.contains("198.18.2.1:8080,198.18.2.2:8080,198.18.2.3:8080"),
        "{ep}"
    );

    let metric = |name: &str| {
        let metrics = bed
            .exec_node(&["curl", "-sS", "http://127.0.0.1:10249/metrics"])
            .unwrap();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
    };
    wait_for(
        "the counters published on /metrics",
        Duration::from_secs(2),
        || {
            metric("lb_datapath_packets_total{verdict=\"dnat_new\"}") == Some(60)
                && metric("lb_services") == Some(1)
        },
    );

    // Idle: nothing changes, so the agent does not sync (its own reads of the manifest folder
    // must not wake it up).
    let before = metric("lb_syncs_total").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        metric("lb_syncs_total"),
        Some(before),
        "the agent kept syncing with nothing changed"
    );
}

#[test]
fn service_without_endpoints_refuses_at_once() {
    let mut bed = testbed();
    let client = bed.add_pod("client", CLIENT_IP).unwrap();
    bed.write_manifest(
        "svc.yaml",
        &service_manifest("empty", "nothing", "198.19.0.20", "  - {port: 80}\n"),
    )
    .unwrap();
    bed.start_agent().unwrap();
    let ep = bed.lb(&["get", "ep"]).unwrap();
    assert!(
        ep.lines()
            .any(|l| l.starts_with("empty ") && l.contains("<none>")),
        "{ep}"
    );

    for _ in 0..5 {
        let (result, took) = bed
            .in_pod(&client, || {
                let started = Instant::now();
                let r = TcpStream::connect_timeout(
                    &"198.19.0.20:80".parse().unwrap(),
                    Duration::from_secs(3),
                );
                (r.map(|_| ()).map_err(|e| e.kind()), started.elapsed())
            })
            .unwrap();
        assert_eq!(result, Err(ErrorKind::ConnectionRefused));
        assert!(took < Duration::from_millis(100), "refused after {took:?}");
    }
}

#[test]
fn udp_through_the_cluster_ip() {
    let mut bed = testbed();
    let client = bed.add_pod("client", CLIENT_IP).unwrap();
    for i in 1..=2 {
        let name = format!("dns-{i}");
        let pod = bed.add_pod(&name, backend_ip(i)).unwrap();
        bed.serve_udp(&pod, 5353).unwrap();
        bed.write_manifest(
            &format!("{name}.yaml"),
            &pod_manifest(&name, "dns", backend_ip(i), &[]),
        )
        .unwrap();
    }
    bed.write_manifest(
        "svc.yaml",
        &service_manifest(
            "dns",
            "dns",
            "198.19.0.53",
            "  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}\n",
        ),
    )
    .unwrap();
    bed.start_agent().unwrap();

    let answers = bed
        .in_pod(&client, || {
            let mut answers = Vec::new();
            for i in 0..40 {
                // A connected socket only accepts datagrams from the ClusterIP itself.
                let socket = UdpSocket::bind((CLIENT_IP, 0)).unwrap();
                socket.connect("198.19.0.53:53").unwrap();
                socket
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .unwrap();
                socket.send(format!("query {i}").as_bytes()).unwrap();
                let mut buf = [0u8; 512];
                let n = socket
                    .recv(&mut buf)
                    .expect("UDP answer from the ClusterIP");
                answers.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            answers
        })
        .unwrap();
    assert!(answers.iter().all(|a| a.ends_with(&format!(
        "query {}",
        answers.iter().position(|b| b == a).unwrap()
    ))));
    assert!(
        answers.iter().any(|a| a.starts_with("dns-1: "))
            && answers.iter().any(|a| a.starts_with("dns-2: ")),
        "{answers:?}"
    );
}

#[test]
fn multi_port_service_with_target_port_by_name() {
    let mut bed = testbed();
    let client = bed.add_pod("client", CLIENT_IP).unwrap();
    // Two pods whose "web" port differs; both also serve echo on "echo".
    for (i, web_port) in [(1u8, 8080u16), (2, 9090)] {
        let name = format!("app-{i}");
        let pod = bed.add_pod(&name, backend_ip(i)).unwrap();
        bed.serve_http(&pod, web_port).unwrap();
        bed.serve_echo(&pod, 7000).unwrap();
        bed.write_manifest(
            &format!("{name}.yaml"),
            &pod_manifest(
                &name,
                "app",
                backend_ip(i),
                &[("web", web_port), ("echo", 7000)],
            ),
        )
        .unwrap();
    }
    bed.write_manifest(
        "svc.yaml",
        &service_manifest("app", "app", "198.19.0.30", "  - {name: http, port: 80, targetPort: web}\n  - {name: echo, port: 7, targetPort: echo}\n"),
    )
    .unwrap();
    bed.start_agent().unwrap();

    let seen = spread(&bed, &client, "http://198.19.0.30/", 40);
    assert_eq!(
        seen.len(),
        2,
        "both pods, each on its own web port: {seen:?}"
    );
    let echoed = bed
        .in_pod(&client, || {
            let mut s = TcpStream::connect_timeout(
                &"198.19.0.30:7".parse().unwrap(),
                Duration::from_secs(2),
            )
            .unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            writeln!(s, "hello").unwrap();
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).unwrap();
            line
        })
        .unwrap();
    assert!(echoed.ends_with(": hello\n"), "{echoed:?}");
    let ep = bed.lb(&["get", "ep"]).unwrap();
    assert!(
        ep.contains("198.18.2.1:8080,198.18.2.2:9090,198.18.2.1:7000 + 1 more..."),
        "{ep}"
    );
}

#[test]
fn endpoints_follow_pods_live_and_bad_manifests_change_nothing() {
    let mut bed = testbed();
    let client = web_pods(&mut bed, 1);
    write_web_service(&bed, 8080);
    bed.start_agent().unwrap();
    assert_eq!(
        spread(&bed, &client, "http://198.19.0.10/", 5)
            .keys()
            .collect::<Vec<_>>(),
        ["web-1"]
    );

    // A second pod appears: it gets traffic within a second.
    let pod = bed.add_pod("web-2", backend_ip(2)).unwrap();
    bed.serve_http(&pod, 8080).unwrap();
    let started = Instant::now();
    bed.write_manifest(
        "web-2.yaml",
        &pod_manifest("web-2", "web", backend_ip(2), &[("http", 8080)]),
    )
    .unwrap();
    wait_for("web-2 in the endpoints", Duration::from_secs(1), || {
        bed.lb(&["get", "ep"]).unwrap().contains("198.18.2.2:8080")
    });
    eprintln!("endpoint added after {:?}", started.elapsed());
    assert!(spread(&bed, &client, "http://198.19.0.10/", 30).contains_key("web-2"));

    // A broken file and an invalid Service: reported, and nothing else changes.
    bed.write_manifest(
        "broken.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: x\n",
    )
    .unwrap();
    write_web_service(&bed, 70000);
    wait_for("both problems reported", Duration::from_secs(2), || {
        let status = bed.lb(&["status"]).unwrap();
        status.contains("broken.yaml") && status.contains("spec.ports[0].targetPort")
    });
    assert_eq!(
        spread(&bed, &client, "http://198.19.0.10/", 20).len(),
        2,
        "old version of web still served"
    );

    // The first pod goes away: no new connection reaches it.
    bed.remove_manifest("web-1.yaml").unwrap();
    wait_for(
        "web-1 gone from the endpoints",
        Duration::from_secs(1),
        || !bed.lb(&["get", "ep"]).unwrap().contains("198.18.2.1:8080"),
    );
    assert_eq!(
        spread(&bed, &client, "http://198.19.0.10/", 20)
            .keys()
            .collect::<Vec<_>>(),
        ["web-2"]
    );
}

#[test]
fn selectorless_service_uses_manual_endpoints() {
    let mut bed = testbed();
    let client = bed.add_pod("client", CLIENT_IP).unwrap();
    let outside = bed
        .add_pod("outside", Ipv4Addr::new(198, 18, 3, 1))
        .unwrap();
    bed.serve_http(&outside, 80).unwrap();
    bed.write_manifest(
        "ext.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec:\n  ports: [{port: 80}]\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: ext}\nsubsets:\n- addresses: [{ip: 198.18.3.1}]\n  ports: [{port: 80}]\n",
    )
    .unwrap();
    bed.start_agent().unwrap();
    let svc = bed.lb(&["get", "svc", "-o", "json"]).unwrap();
    let views: serde_json::Value = serde_json::from_str(&svc).unwrap();
    let ip = views[0]["cluster_ip"].as_str().unwrap().to_string();
    assert!(
        ip.starts_with("198.19."),
        "allocated from the service CIDR: {ip}"
    );
    let body = bed
        .curl(&client, &format!("http://{ip}/"), Duration::from_secs(2))
        .unwrap();
    assert_eq!(body.trim(), "outside");
}

#[test]
fn switching_the_attach_mode_across_a_restart_leaves_one_attachment() {
    let mut bed = testbed();
    let client = web_pods(&mut bed, 2);
    write_web_service(&bed, 8080);
    let link = client.node_iface.clone();
    let ifindex = bed
        .exec_node(&["ip", "-o", "link", "show", "dev", &link])
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .trim()
        .to_string();
    // Ingress programs of ours on the client's link: (TCX links pinned and alive, clsact
    // filters). This bpftool predates TCX in `net show`: the links are found by their pins.
    let attachments = |bed: &Testbed| {
        let net = bed
            .exec_node(&["bpftool", "net", "show", "dev", &link])
            .unwrap();
        let filters = net
            .lines()
            .filter(|l| l.contains("clsact/ingress lb_tc_ingress"))
            .count();
        let pins = std::fs::read_dir(bed.bpffs_of(0).join("links")).unwrap();
        let tcx = pins
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("tc-ingress-{ifindex}-"))
            })
            // Run here, not in the node namespace: `ip netns exec` hides the bpffs.
            .filter(|e| {
                std::process::Command::new("bpftool")
                    .args(["link", "show", "pinned"])
                    .arg(e.path())
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .count();
        (tcx, filters, net)
    };
    for (mode, expected) in [("legacy", (0, 1)), ("tcx", (1, 0)), ("legacy", (0, 1))] {
        bed.start_agent_with(&["--tc-attach", mode]).unwrap();
        let (tcx, filters, net) = attachments(&bed);
        assert_eq!(
            (tcx, filters),
            expected,
            "after a start with {mode}:\n{net}"
        );
        let seen = spread(&bed, &client, "http://198.19.0.10/", 10);
        assert_eq!(seen.values().sum::<usize>(), 10, "{seen:?}");
        bed.stop_agent(false).unwrap();
    }
}

#[test]
fn established_tcp_connection_survives_agent_restart() {
    let mut bed = testbed();
    let client = bed.add_pod("client", CLIENT_IP).unwrap();
    for i in 1..=3 {
        let name = format!("echo-{i}");
        let pod = bed.add_pod(&name, backend_ip(i)).unwrap();
        bed.serve_echo(&pod, 7000).unwrap();
        bed.write_manifest(
            &format!("{name}.yaml"),
            &pod_manifest(&name, "echo", backend_ip(i), &[]),
        )
        .unwrap();
    }
    bed.write_manifest(
        "svc.yaml",
        &service_manifest(
            "echo",
            "echo",
            "198.19.0.7",
            "  - {port: 7, targetPort: 7000}\n",
        ),
    )
    .unwrap();
    bed.start_agent().unwrap();

    let vip: SocketAddr = "198.19.0.7:7".parse().unwrap();
    let stream = bed
        .in_pod(&client, move || {
            let s = TcpStream::connect_timeout(&vip, Duration::from_secs(2)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s
        })
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut writer = stream;
    let mut exchange = |msg: &str| {
        writeln!(writer, "{msg}").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        line.trim().to_string()
    };
    let first = exchange("before");
    let server = first.split(':').next().unwrap().to_string();

    bed.stop_agent(true).unwrap();
    assert_eq!(
        exchange("agent killed"),
        format!("{server}: agent killed"),
        "datapath serves without the agent"
    );
    bed.start_agent().unwrap();
    for i in 0..5 {
        assert_eq!(
            exchange(&format!("after {i}")),
            format!("{server}: after {i}"),
            "same backend after restart"
        );
    }
    assert!(
        spread_echo(&bed, &client, vip) >= 2,
        "new connections still balanced after restart"
    );
}

fn spread_echo(bed: &Testbed, client: &Pod, vip: SocketAddr) -> usize {
    bed.in_pod(client, move || {
        let mut servers = std::collections::BTreeSet::new();
        for _ in 0..30 {
            let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(2)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            writeln!(s, "x").unwrap();
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line).unwrap();
            servers.insert(line.split(':').next().unwrap().to_string());
        }
        servers.len()
    })
    .unwrap()
}
