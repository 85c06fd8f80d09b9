//! Connect-time load balancing: processes in the cgroup the agent attached its socket
//! programs to (one the test made) reach Services from the node's own namespace and from
//! pods, see the Service as their peer, and put only pod addresses on the wire.
use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::Duration,
};

mod support;

use serde_json::Value;
use xtask::testbed::{Pod, Testbed, wait_for};

const PROBE: &str = include_str!("support/sockprobe.py");
const VIP: &str = "198.19.0.10";

/// Where a probe runs.
#[derive(Clone, Copy)]
enum Place<'a> {
    /// A node's own namespace, in the node's cgroup (a host-network process).
    Node(usize),
    /// A pod, in the node's cgroup.
    PodInCgroup(&'a Pod),
    /// A pod outside the cgroup: the TC programs serve it.
    PodOutside(&'a Pod),
}

/// The socket probe's path, written into the testbed's folder on first use.
fn probe_script(bed: &Testbed) -> String {
    let script = bed.dir.join("sockprobe.py");
    if !script.exists() {
        std::fs::write(&script, PROBE).unwrap();
    }
    script.display().to_string()
}

/// Runs the socket probe and returns its reports.
fn probe(bed: &Testbed, place: Place, args: &[&str]) -> Vec<Value> {
    let script = probe_script(bed);
    let mut command = vec!["python3", script.as_str()];
    command.extend_from_slice(args);
    let out = match place {
        Place::Node(node) => bed.exec_node_in_cgroup(node, &command),
        Place::PodInCgroup(pod) => bed.exec_pod_in_cgroup(pod, &command),
        Place::PodOutside(pod) => bed.exec(pod, &command),
    }
    .expect("socket probe");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn field<'a>(report: &'a Value, name: &str) -> &'a str {
    report[name]
        .as_str()
        .unwrap_or_else(|| panic!("no {name} in {report}"))
}

fn pod_manifest(name: &str, ip: Ipv4Addr, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: web}}\nspec:\n  nodeName: {node}\n  containers:\n  - name: server\n    image: example\nstatus:\n  podIP: {ip}\n"
    )
}

/// `web` at 198.19.0.10: HTTP on 80/TCP, the pods' UDP answer on 53/UDP.
fn web_service(extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  clusterIP: {VIP}\n  selector: {{app: web}}\n{extra}  ports:\n  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}\n  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}\n"
    )
}

fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, i)
}

/// A testbed whose agent attaches the socket programs to a cgroup of the test's own, with
/// a client pod and `n` `web` pods serving HTTP on 8080 and UDP on 5353.
fn testbed(n: u8) -> (Testbed, Pod) {
    let mut bed = support::bed::testbed(1);
    bed.enable_socket_lb().unwrap();
    let client = bed.add_pod("client", Ipv4Addr::new(198, 18, 1, 1)).unwrap();
    for i in 1..=n {
        let name = format!("web-{i}");
        let pod = bed.add_pod(&name, backend_ip(i)).unwrap();
        bed.serve_http(&pod, 8080).unwrap();
        bed.serve_udp(&pod, 5353).unwrap();
        bed.write_manifest(
            &format!("{name}.yaml"),
            &pod_manifest(&name, backend_ip(i), "node-1"),
        )
        .unwrap();
    }
    (bed, client)
}

fn counter(bed: &Testbed, name: &str) -> u64 {
    let status: Value = serde_json::from_str(&bed.lb(&["status", "-o", "json"]).unwrap()).unwrap();
    status["counters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c[0] == name)
        .and_then(|c| c[1].as_u64())
        .unwrap_or_else(|| panic!("no counter {name}"))
}

/// The bodies of HTTP answers, checking that every connection saw the Service as its peer.
fn http_through_service(bed: &Testbed, place: Place, count: usize) -> BTreeSet<String> {
    let reports = probe(bed, place, &["tcp", VIP, "80", &count.to_string()]);
    assert_eq!(reports.len(), count);
    reports
        .iter()
        .map(|r| {
            assert_eq!(field(r, "peer"), format!("{VIP}:80"), "{r}");
            field(r, "body").to_string()
        })
        .collect()
}

fn all_web(n: u8) -> BTreeSet<String> {
    (1..=n).map(|i| format!("web-{i}")).collect()
}

#[test]
fn node_processes_reach_services_over_tcp_and_udp_and_see_the_service_as_peer() {
    let (mut bed, _client) = testbed(3);
    bed.write_manifest("svc.yaml", &web_service("")).unwrap();
    bed.start_agent().unwrap();
    let status = bed.lb(&["status"]).unwrap();
    let cgroup = bed.cgroup_of(0).unwrap().display().to_string();
    assert!(
        status.contains(&format!("connect-time load balancing: {cgroup}")),
        "{status}"
    );

    // TCP from the node's own namespace: without the socket programs nothing translates it.
    assert_eq!(http_through_service(&bed, Place::Node(0), 30), all_web(3));

    // Connected UDP: the peer is the Service, answers come from it.
    let reports = probe(&bed, Place::Node(0), &["udp-connected", VIP, "53", "5"]);
    assert_eq!(reports.len(), 5, "{reports:?}");
    let answered: BTreeSet<&str> = reports
        .iter()
        .map(|r| {
            assert_eq!(field(r, "peer"), format!("{VIP}:53"), "{r}");
            assert_eq!(field(r, "source"), format!("{VIP}:53"), "{r}");
            field(r, "body").split(':').next().unwrap()
        })
        .collect();
    assert_eq!(
        answered.len(),
        1,
        "one connected socket, one backend: {answered:?}"
    );

    // Unconnected UDP, as resolvers send: each datagram translated, every answer from the
    // Service's address.
    let reports = probe(&bed, Place::Node(0), &["udp-unconnected", VIP, "53", "30"]);
    assert_eq!(reports.len(), 30, "{reports:?}");
    let answered: BTreeSet<String> = reports
        .iter()
        .map(|r| {
            assert_eq!(field(r, "source"), format!("{VIP}:53"), "{r}");
            field(r, "body").split(':').next().unwrap().to_string()
        })
        .collect();
    assert_eq!(answered, all_web(3), "datagrams spread over the backends");

    assert!(counter(&bed, "sock_connect") >= 31);
    assert!(counter(&bed, "sock_sendmsg") >= 30);
    assert!(counter(&bed, "sock_reverse_nat") >= 30 + 5 + 31);
    // The packets went to the pods' addresses: the TC programs had nothing to translate.
    assert_eq!(counter(&bed, "dnat_new"), 0);
}

#[test]
fn pod_clients_in_the_cgroup_put_only_pod_addresses_on_the_wire() {
    let (mut bed, client) = testbed(2);
    bed.write_manifest("svc.yaml", &web_service("")).unwrap();
    bed.start_agent().unwrap();

    // Everything on the client's link while it calls the Service.
    let mut tcpdump = Command::new("ip")
        .args([
            "netns",
            "exec",
            &bed.node_netns,
            "tcpdump",
            "-l",
            "-n",
            "-i",
        ])
        .arg(&client.node_iface)
        .args(["tcp or udp"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(tcpdump.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("listening") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "tcpdump did not start"
        );
    }

    assert_eq!(
        http_through_service(&bed, Place::PodInCgroup(&client), 10),
        all_web(2)
    );
    let reports = probe(
        &bed,
        Place::PodInCgroup(&client),
        &["udp-unconnected", VIP, "53", "4"],
    );
    assert!(
        reports
            .iter()
            .all(|r| field(r, "source") == format!("{VIP}:53")),
        "{reports:?}"
    );

    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tcpdump.id() as i32, libc::SIGINT) };
    let out = tcpdump.wait_with_output().unwrap();
    let seen = String::from_utf8_lossy(&out.stdout);
    let packets: Vec<&str> = seen.lines().filter(|l| l.contains(" IP ")).collect();
    assert!(
        packets
            .iter()
            .any(|l| l.contains("198.18.2.1") || l.contains("198.18.2.2")),
        "no packet to a backend seen:\n{seen}"
    );
    assert!(
        packets.iter().all(|l| !l.contains(VIP)),
        "the Service's address went on the wire:\n{seen}"
    );
    assert_eq!(counter(&bed, "dnat_new"), 0);
}

#[test]
fn a_service_without_endpoints_refuses_connect_at_once_and_outside_the_cgroup_tc_serves() {
    let (mut bed, client) = testbed(2);
    bed.write_manifest("svc.yaml", &web_service("")).unwrap();
    bed.write_manifest(
        "empty.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: empty}\nspec:\n  clusterIP: 198.19.0.11\n  selector: {app: nothing}\n  ports:\n  - {name: http, port: 80, protocol: TCP}\n  - {name: dns, port: 53, protocol: UDP}\n",
    )
    .unwrap();
    bed.start_agent().unwrap();

    for place in [Place::Node(0), Place::PodInCgroup(&client)] {
        let reports = probe(&bed, place, &["tcp", "198.19.0.11", "80", "3"]);
        for r in &reports {
            assert_eq!(field(r, "error"), "ECONNREFUSED", "{r}");
            assert!(
                r["ms"].as_f64().unwrap() < 100.0,
                "refused within 100 ms: {r}"
            );
        }
        let reports = probe(&bed, place, &["udp-connected", "198.19.0.11", "53", "1"]);
        assert_eq!(field(&reports[0], "error"), "ECONNREFUSED", "{reports:?}");
    }
    assert!(counter(&bed, "sock_no_endpoints") >= 8);

    // A pod outside the cgroup: the TC programs translate its packets, as before.
    let connects = counter(&bed, "sock_connect");
    assert_eq!(
        http_through_service(&bed, Place::PodOutside(&client), 10),
        all_web(2)
    );
    assert_eq!(counter(&bed, "sock_connect"), connects);
    assert!(counter(&bed, "dnat_new") >= 10);
}

#[test]
fn client_ip_affinity_holds_for_a_client_translated_at_connect() {
    let (mut bed, client) = testbed(3);
    bed.write_manifest("svc.yaml", &web_service("  sessionAffinity: ClientIP\n"))
        .unwrap();
    bed.start_agent().unwrap();
    let from_node = http_through_service(&bed, Place::Node(0), 15);
    assert_eq!(from_node.len(), 1, "{from_node:?}");
    let from_pod = http_through_service(&bed, Place::PodInCgroup(&client), 15);
    assert_eq!(from_pod.len(), 1, "{from_pod:?}");
}

#[test]
fn a_node_process_reaches_endpoints_on_other_nodes_and_internal_local_keeps_to_its_node() {
    let mut bed = support::bed::testbed(2);
    bed.enable_socket_lb().unwrap();
    for (node, i) in [(0, 1), (1, 2)] {
        let name = format!("web-{i}");
        let pod = bed.add_pod_on(node, &name, backend_ip(i)).unwrap();
        bed.serve_http(&pod, 8080).unwrap();
        bed.serve_udp(&pod, 5353).unwrap();
        let manifest = pod_manifest(&name, backend_ip(i), &format!("node-{}", node + 1));
        bed.write_manifest(&format!("{name}.yaml"), &manifest)
            .unwrap();
    }
    bed.write_manifest("svc.yaml", &web_service("")).unwrap();
    bed.write_manifest(
        "local.yaml",
        &web_service("  internalTrafficPolicy: Local\n")
            .replace("name: web}", "name: local}")
            .replace(VIP, "198.19.0.12"),
    )
    .unwrap();
    bed.start_agent().unwrap();

    for node in [0, 1] {
        let reports = probe(&bed, Place::Node(node), &["tcp", VIP, "80", "30"]);
        let bodies: BTreeSet<&str> = reports.iter().map(|r| field(r, "body")).collect();
        assert_eq!(bodies, ["web-1", "web-2"].into(), "from node {node}");
        assert!(
            reports
                .iter()
                .all(|r| field(r, "peer") == format!("{VIP}:80"))
        );
        let local = probe(&bed, Place::Node(node), &["tcp", "198.19.0.12", "80", "10"]);
        let bodies: BTreeSet<&str> = local.iter().map(|r| field(r, "body")).collect();
        assert_eq!(
            bodies,
            [format!("web-{}", node + 1).as_str()].into(),
            "from node {node}"
        );
    }
}

#[test]
fn a_connected_udp_socket_whose_backend_goes_is_closed_and_reconnects_to_a_live_one() {
    let (mut bed, client) = testbed(2);
    bed.write_manifest("svc.yaml", &web_service("")).unwrap();
    bed.start_agent().unwrap();
    let script = probe_script(&bed);
    let mut stream = bed
        .spawn_pod_in_cgroup(
            &client,
            &["python3", &script, "udp-stream", VIP, "53", "20"],
        )
        .unwrap();
    let mut reports = BufReader::new(stream.stdout.take().unwrap()).lines();
    let mut next = || -> Value { serde_json::from_str(&reports.next().unwrap().unwrap()).unwrap() };
    assert_eq!(field(&next(), "peer"), format!("{VIP}:53"));
    let first = next();
    let backend = field(&first, "body").split(':').next().unwrap().to_string();

    // The socket's backend goes: its next receive fails, within a second or so.
    let removed = std::time::Instant::now();
    bed.remove_manifest(&format!("{backend}.yaml")).unwrap();
    let ended = loop {
        let report = next();
        if report.get("error").is_some() {
            break report;
        }
        assert!(
            removed.elapsed() < Duration::from_secs(5),
            "still open 5 s after its backend went: {report}"
        );
    };
    assert!(
        ["ECONNABORTED", "EDESTADDRREQ"].contains(&field(&ended, "error")),
        "{ended}"
    );
    let _ = stream.kill();
    let _ = stream.wait();
    let log = std::fs::read_to_string(bed.agent_log()).unwrap();
    assert!(
        log.contains("connected UDP sockets to removed backends closed"),
        "{log}"
    );

    // Connected again, the socket gets the backend that is left.
    let left = if backend == "web-1" { "web-2" } else { "web-1" };
    let reports = probe(
        &bed,
        Place::PodInCgroup(&client),
        &["udp-connected", VIP, "53", "3"],
    );
    for r in &reports {
        assert!(field(r, "body").starts_with(left), "{r}");
    }
}

/// The programs attached to a cgroup, as bpftool lists them.
fn attached_programs(bed: &Testbed) -> Vec<String> {
    let cgroup = bed.cgroup_of(0).unwrap().display().to_string();
    let out = Command::new("bpftool")
        .args(["cgroup", "show", &cgroup])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("lb_sock_"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn the_attachment_outlives_the_agent_and_a_restart_reuses_it_once() {
    let (mut bed, _client) = testbed(2);
    bed.write_manifest("svc.yaml", &web_service("")).unwrap();
    bed.start_agent().unwrap();
    assert_eq!(
        attached_programs(&bed).len(),
        4,
        "{:?}",
        attached_programs(&bed)
    );

    bed.stop_agent(true).unwrap();
    // Without an agent, the pinned programs and maps serve.
    assert_eq!(http_through_service(&bed, Place::Node(0), 10), all_web(2));

    bed.start_agent().unwrap();
    wait_for("one attachment per hook", Duration::from_secs(5), || {
        attached_programs(&bed).len() == 4
    });
    assert_eq!(http_through_service(&bed, Place::Node(0), 10), all_web(2));

    // Switched off across a restart: detached, and the node's processes reach nothing.
    bed.stop_agent(false).unwrap();
    bed.start_agent_with(&["--socket-lb=false"]).unwrap();
    wait_for("no attachment", Duration::from_secs(5), || {
        attached_programs(&bed).is_empty()
    });
    let status = bed.lb(&["status"]).unwrap();
    assert!(
        status.contains("connect-time load balancing: off"),
        "{status}"
    );
    let reports = probe(&bed, Place::Node(0), &["tcp", VIP, "80", "1"]);
    assert!(reports[0].get("error").is_some(), "{reports:?}");

    // On again, then `lb reset` removes it.
    bed.stop_agent(false).unwrap();
    bed.start_agent().unwrap();
    assert_eq!(attached_programs(&bed).len(), 4);
    bed.stop_agent(false).unwrap();
    bed.reset_datapaths().unwrap();
    assert!(
        attached_programs(&bed).is_empty(),
        "{:?}",
        attached_programs(&bed)
    );
}

#[test]
fn a_cgroup_that_is_not_one_is_refused_by_name() {
    let (mut bed, _client) = testbed(0);
    let err = bed
        .start_agent_with(&["--cgroup", "/tmp"])
        .expect_err("--cgroup /tmp accepted");
    assert!(
        err.to_string()
            .contains("--cgroup /tmp: not a cgroup v2 directory"),
        "{err}"
    );
}
