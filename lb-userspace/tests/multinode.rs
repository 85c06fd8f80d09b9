//! Whole behaviour across two simulated nodes joined by a LAN, each with its own agent:
//! clients on node 1 (index 0), backends on node 2 (index 1) unless a test says otherwise.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

mod support;

use support::web::*;
use xtask::testbed::{Pod, Testbed, wait_for};

fn two_nodes() -> Testbed {
    support::bed::testbed(2)
}

/// A line-echo connection through the ClusterIP, opened in the client pod.
struct Echo {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Echo {
    fn open(bed: &Testbed, client: &Pod) -> Echo {
        let stream = bed
            .in_pod(client, || {
                TcpStream::connect_timeout(
                    &format!("{VIP}:7").parse::<SocketAddr>().unwrap(),
                    Duration::from_secs(2),
                )
            })
            .unwrap()
            .expect("connect through the ClusterIP");
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        assert_eq!(
            stream.peer_addr().unwrap(),
            format!("{VIP}:7").parse::<SocketAddr>().unwrap()
        );
        Echo {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        }
    }

    /// Sends a line; returns the answering pod's name.
    fn exchange(&mut self, line: &str) -> std::io::Result<String> {
        self.writer.write_all(format!("{line}\n").as_bytes())?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let (pod, echoed) = answer.trim_end().split_once(": ").unwrap_or_default();
        assert_eq!(echoed, line);
        Ok(pod.to_string())
    }
}

#[test]
fn a_pod_reaches_a_cluster_ip_whose_endpoints_are_on_another_node() {
    let mut bed = two_nodes();
    let (client, _) = web_pods(&mut bed, 2, 1);
    bed.write_manifest("svc.yaml", &web_service("")).unwrap();
    bed.start_agent().unwrap();

    assert_eq!(
        spread(&bed, &client, 30),
        ["web-1", "web-2"].map(String::from).into(),
        "TCP over the LAN, replies translated on the client's node"
    );
    // UDP: a connected socket accepts datagrams only from the ClusterIP it connected to.
    let answers = bed
        .in_pod(&client, || {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.connect(format!("{VIP}:53")).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            (0..10)
                .map(|i| {
                    socket.send(format!("q{i}").as_bytes()).unwrap();
                    let mut buf = [0u8; 512];
                    let n = socket
                        .recv(&mut buf)
                        .expect("UDP answer from the ClusterIP");
                    String::from_utf8_lossy(&buf[..n]).to_string()
                })
                .collect::<Vec<_>>()
        })
        .unwrap();
    assert!(answers.iter().all(|a| a.starts_with("web-")), "{answers:?}");
    // The client's node translated the replies arriving on its uplink.
    assert!(counter(&bed, 0, "reverse_nat") > 0);
    assert!(
        bed.lb_on(1, &["status"]).unwrap().contains("eth0"),
        "the uplink is attached"
    );
}

#[test]
fn established_connections_drain_through_not_ready_and_terminating() {
    let mut bed = two_nodes();
    let (client, _) = web_pods(&mut bed, 2, 1);
    bed.write_manifest("svc.yaml", &web_service("")).unwrap();
    bed.start_agent().unwrap();

    // Open connections until one lands on web-1 and one on web-2.
    let mut on = std::collections::BTreeMap::new();
    for _ in 0..40 {
        let mut echo = Echo::open(&bed, &client);
        let pod = echo.exchange("hello").unwrap();
        on.entry(pod).or_insert(echo);
        if on.len() == 2 {
            break;
        }
    }
    let mut to_web1 = on.remove("web-1").expect("a connection to web-1");

    // web-1 turns NotReady: it keeps its connection, new ones avoid it.
    bed.write_manifest(
        "web-1.yaml",
        &pod_manifest("web-1", backend_ip(1), "", NOT_READY),
    )
    .unwrap();
    wait_for(
        "web-1 to leave the endpoints",
        Duration::from_secs(5),
        || {
            !bed.lb_on(0, &["get", "ep"])
                .unwrap()
                .contains("198.18.2.1:")
        },
    );
    assert_eq!(spread(&bed, &client, 20), ["web-2".to_string()].into());
    assert_eq!(to_web1.exchange("still there").unwrap(), "web-1");

    // Terminating too (and still serving): the same.
    bed.write_manifest(
        "web-1.yaml",
        &pod_manifest("web-1", backend_ip(1), DELETING, ""),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(spread(&bed, &client, 20), ["web-2".to_string()].into());
    assert_eq!(to_web1.exchange("terminating").unwrap(), "web-1");

    // web-2 terminates as well: with no ready endpoint, the serving-terminating ones take
    // new connections.
    bed.write_manifest(
        "web-2.yaml",
        &pod_manifest("web-2", backend_ip(2), DELETING, ""),
    )
    .unwrap();
    wait_for("the terminating fallback", Duration::from_secs(5), || {
        spread(&bed, &client, 20).len() == 2
    });
    assert_eq!(to_web1.exchange("fallback").unwrap(), "web-1");

    // web-1 removed altogether: its connection ends with a reset from the new pick, at
    // once, rather than hanging.
    bed.remove_manifest("web-1.yaml").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    let result = to_web1.exchange("gone");
    assert!(result.is_err(), "{result:?}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "reset, not a timeout: {:?}",
        started.elapsed()
    );
}

#[test]
fn publish_not_ready_addresses_makes_not_ready_pods_serve() {
    let mut bed = two_nodes();
    let client = bed.add_pod_on(0, "client", CLIENT_IP).unwrap();
    let pod = bed.add_pod_on(1, "web-1", backend_ip(1)).unwrap();
    bed.serve_http(&pod, 8080).unwrap();
    bed.write_manifest(
        "web-1.yaml",
        &pod_manifest("web-1", backend_ip(1), "", NOT_READY),
    )
    .unwrap();
    bed.write_manifest("svc.yaml", &web_service("")).unwrap();
    bed.start_agent().unwrap();
    assert!(
        curl(&bed, &client, &format!("http://{VIP}/")).is_err(),
        "not ready: refused"
    );
    bed.write_manifest(
        "svc.yaml",
        &web_service("  publishNotReadyAddresses: true\n"),
    )
    .unwrap();
    wait_for("the not-ready pod to serve", Duration::from_secs(5), || {
        curl(&bed, &client, &format!("http://{VIP}/")).is_ok_and(|b| b == "web-1")
    });
}

#[test]
fn a_direct_connection_after_a_service_connection_from_the_same_port_keeps_its_addresses() {
    let mut bed = two_nodes();
    let (client, _) = web_pods(&mut bed, 1, 1);
    bed.write_manifest("svc.yaml", &web_service("")).unwrap();
    bed.start_agent().unwrap();
    let (via_service, direct) = bed
        .in_pod(&client, || {
            let via_service = http_from(
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 41234),
                &format!("{VIP}:80"),
            );
            // Same client port, straight to the pod: its replies must keep the pod's address.
            let direct = http_from(
                SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 41234),
                "198.18.2.1:8080",
            );
            (via_service, direct)
        })
        .unwrap();
    assert_eq!(via_service.unwrap(), "web-1");
    assert_eq!(
        direct.expect("the direct connection's replies come from the pod's address"),
        "web-1"
    );
}

fn metric(bed: &Testbed, node: usize, name: &str) -> u64 {
    let metrics = bed
        .exec_on_node(node, &["curl", "-sS", "http://127.0.0.1:10249/metrics"])
        .unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
}

#[test]
fn conntrack_entries_leave_after_fin_and_after_their_timeout() {
    let mut bed = two_nodes();
    let (client, _) = web_pods(&mut bed, 1, 1);
    bed.write_manifest("svc.yaml", &web_service("")).unwrap();
    bed.start_agent_with(&[
        "--conntrack-tcp-timeout-close",
        "1s",
        "--conntrack-udp-timeout",
        "2s",
        "--conntrack-gc-interval",
        "500ms",
    ])
    .unwrap();

    // A kept-open connection stays tracked; closed ones leave after the closing timeout.
    let mut echo = Echo::open(&bed, &client);
    echo.exchange("open").unwrap();
    for _ in 0..5 {
        curl(&bed, &client, &format!("http://{VIP}/")).unwrap();
    }
    wait_for(
        "closed flows to be collected",
        Duration::from_secs(6),
        || metric(&bed, 0, "lb_conntrack_gc_deleted_total") >= 10,
    );
    assert_eq!(
        metric(&bed, 0, "lb_conntrack_entries"),
        2,
        "the open flow stays"
    );
    echo.exchange("still tracked").unwrap();

    // UDP: gone once idle longer than its timeout.
    bed.in_pod(&client, || {
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect(format!("{VIP}:53")).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        socket.send(b"q").unwrap();
        let mut buf = [0u8; 64];
        socket.recv(&mut buf).expect("UDP answer");
    })
    .unwrap();
    wait_for("the UDP flow to be tracked", Duration::from_secs(2), || {
        metric(&bed, 0, "lb_conntrack_entries") == 4
    });
    wait_for("the UDP flow to expire", Duration::from_secs(6), || {
        metric(&bed, 0, "lb_conntrack_entries") == 2
    });
    drop(echo);
}

const BULK_VIP: &str = "198.19.0.20";

/// The `bulk` Service: TCP 90 -> 9000 (bulk transfers) on the `web` pods.
fn bulk_service() -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: bulk}}\nspec:\n  clusterIP: {BULK_VIP}\n  selector: {{app: web}}\n  ports:\n  - {{name: bulk, port: 90, targetPort: 9000}}\n"
    )
}

/// A bulk transfer from the client through the `bulk` Service: `GET` downloads `n` bytes,
/// `PUT` uploads them; returns how many bytes the receiving end got.
fn bulk(bed: &Testbed, client: &Pod, verb: &'static str, n: u64) -> std::io::Result<u64> {
    use std::io::Read as _;
    bed.in_pod(client, move || -> std::io::Result<u64> {
        let vip: SocketAddr = format!("{BULK_VIP}:90").parse().unwrap();
        let mut stream = TcpStream::connect_timeout(&vip, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(8)))?;
        stream.set_write_timeout(Some(Duration::from_secs(8)))?;
        stream.write_all(format!("{verb} {n}\n").as_bytes())?;
        if verb == "GET" {
            let mut got = 0u64;
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stream.read(&mut buf)? {
                    0 => return Ok(got),
                    k => got += k as u64,
                }
            }
        }
        let chunk = vec![b'y'; 16 * 1024];
        let mut left = n;
        while left > 0 {
            let take = left.min(chunk.len() as u64) as usize;
            stream.write_all(&chunk[..take])?;
            left -= take as u64;
        }
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer)?;
        Ok(answer.trim().parse().unwrap_or(0))
    })
    .unwrap()
}

#[test]
fn path_mtu_discovery_works_through_a_cluster_ip() {
    let mut bed = two_nodes();
    let (client, servers) = web_pods(&mut bed, 1, 1);
    bed.serve_bytes(&servers[0], 9000).unwrap();
    bed.write_manifest("bulk.yaml", &bulk_service()).unwrap();
    bed.start_agent().unwrap();
    let node0 = bed.node_netns_list()[0].clone();
    const SIZE: u64 = 256 * 1024;
    assert_eq!(bulk(&bed, &client, "GET", 1000).unwrap(), 1000);

    // Download across a 1200-byte hop: the client's link, on its node's side (the pod's end
    // keeps 1500, so the client announces a 1460-byte MSS). The node's "fragmentation
    // needed" must reach the backend, about the packet as the backend sent it.
    // Senders hand the kernel packets of the path's size, not large segmentation-offload
    // ones (which a veth lets through whatever its MTU), as across a real router.
    for pod in [&client, &servers[0]] {
        bed.exec(pod, &["ethtool", "-K", "eth0", "tso", "off", "gso", "off"])
            .unwrap();
    }
    bed.set_mtu(&node0, &client.node_iface, 1200).unwrap();
    assert_eq!(
        bulk(&bed, &client, "GET", SIZE).expect("256 KiB download across a 1200-byte hop"),
        SIZE
    );
    bed.set_mtu(&node0, &client.node_iface, 1500).unwrap();
    assert!(
        counter(&bed, 1, "pass_icmp_error") > 0,
        "the backend's node saw the hop's error go by, untranslated"
    );

    // Upload across a 1200-byte hop: the client node's uplink. Its "fragmentation needed"
    // quotes the packet as sent on to the backend: the client must see the ClusterIP there.
    // Another client: the backend now knows the first one's path MTU and would announce
    // an MSS that fits it.
    let uploader = bed
        .add_pod_on(0, "uploader", Ipv4Addr::new(198, 18, 1, 2))
        .unwrap();
    bed.exec(
        &uploader,
        &["ethtool", "-K", "eth0", "tso", "off", "gso", "off"],
    )
    .unwrap();
    wait_for(
        "the agent to attach to the new pod's link",
        Duration::from_secs(5),
        || {
            bed.lb_on(0, &["status"])
                .unwrap()
                .lines()
                .any(|l| l.starts_with("attached interfaces") && l.contains(&uploader.node_iface))
        },
    );
    bed.set_mtu(&node0, "eth0", 1200).unwrap();
    assert_eq!(
        bulk(&bed, &uploader, "PUT", SIZE).expect("256 KiB upload across a 1200-byte hop"),
        SIZE
    );
    let status = bed.lb_on(0, &["status"]).unwrap();
    assert!(counter(&bed, 0, "icmp_error_translated") > 0, "{status}");
}

#[test]
fn a_backends_port_unreachable_reaches_a_connected_udp_client() {
    let mut bed = two_nodes();
    let (client, _) = web_pods(&mut bed, 1, 1);
    // Nothing listens on the target port.
    bed.write_manifest(
        "closed.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: closed}\nspec:\n  clusterIP: 198.19.0.21\n  selector: {app: web}\n  ports:\n  - {port: 54, targetPort: 5999, protocol: UDP}\n",
    )
    .unwrap();
    bed.start_agent().unwrap();
    let error = bed
        .in_pod(&client, || {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.connect("198.19.0.21:54").unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            socket.send(b"anyone?").unwrap();
            let mut buf = [0u8; 64];
            socket.recv(&mut buf).map(|_| ()).unwrap_err().kind()
        })
        .unwrap();
    assert_eq!(error, std::io::ErrorKind::ConnectionRefused);
    assert!(counter(&bed, 0, "icmp_error_translated") > 0);
}

#[test]
fn udp_datagrams_larger_than_the_mtu_cross_in_fragments_both_ways() {
    let mut bed = two_nodes();
    let (client, _) = web_pods(&mut bed, 1, 1);
    bed.write_manifest("svc.yaml", &web_service("")).unwrap();
    bed.start_agent().unwrap();
    let answer = bed
        .in_pod(&client, || {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.connect(format!("{VIP}:53")).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let query: Vec<u8> = (0..4000u32).map(|i| b'a' + (i % 26) as u8).collect();
            let mut buf = vec![0u8; 65536];
            // A first datagram may meet an ARP exchange that holds only the last fragments.
            for _ in 0..3 {
                socket.send(&query).unwrap();
                if let Ok(n) = socket.recv(&mut buf) {
                    return Some((query, buf[..n].to_vec()));
                }
            }
            None
        })
        .unwrap();
    let (query, answer) = answer.expect("a 4,000-byte answer through the ClusterIP");
    assert_eq!(&answer[..7], b"web-1: ");
    assert_eq!(&answer[7..], &query[..], "4,000 bytes each way, whole");
}

#[test]
fn a_pod_reaching_its_own_service_gets_its_answer() {
    let mut bed = two_nodes();
    let me = bed.add_pod_on(0, "web-1", backend_ip(1)).unwrap();
    let other = bed.add_pod_on(1, "web-2", backend_ip(2)).unwrap();
    for pod in [&me, &other] {
        bed.serve_http(pod, 8080).unwrap();
        bed.write_manifest(
            &format!("{}.yaml", pod.name),
            &pod_manifest(&pod.name, pod.ip, "", ""),
        )
        .unwrap();
    }
    bed.write_manifest("svc.yaml", &web_service("")).unwrap();
    bed.start_agent().unwrap();
    assert_eq!(
        spread(&bed, &me, 30),
        ["web-1", "web-2"].map(String::from).into(),
        "web-1 reaches itself and the other endpoint"
    );
    let vip: Ipv4Addr = VIP.parse().unwrap();
    assert!(
        bed.accepted("web-1").iter().any(|peer| peer.ip() == vip),
        "its own connections arrive from the Service address: {:?}",
        bed.accepted("web-1")
    );
    assert!(counter(&bed, 0, "hairpin") > 0);
}

#[test]
fn a_restart_leaves_every_address_with_its_service() {
    let mut bed = two_nodes();
    let (client, _) = web_pods(&mut bed, 1, 1);
    // "zzz" gets an allocated address; "aaa", sorting first, then asks for the same one.
    let service = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n{ip}  selector: {{app: web}}\n  ports:\n  - {{port: 80, targetPort: 8080}}\n"
        )
    };
    bed.write_manifest("zzz.yaml", &service("zzz", "")).unwrap();
    bed.start_agent().unwrap();
    let cluster_ip = |bed: &Testbed, node: usize, name: &str| -> Option<String> {
        bed.lb_on(node, &["get", "svc"])
            .unwrap()
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| l.split_whitespace().nth(2).map(String::from))
    };
    let ip = cluster_ip(&bed, 0, "zzz").expect("zzz listed");
    assert_eq!(
        cluster_ip(&bed, 1, "zzz").as_ref(),
        Some(&ip),
        "both nodes agree"
    );
    bed.write_manifest("aaa.yaml", &service("aaa", &format!("  clusterIP: {ip}\n")))
        .unwrap();
    wait_for("aaa to be rejected", Duration::from_secs(5), || {
        bed.lb_on(0, &["status"])
            .unwrap()
            .contains("already allocated")
    });
    assert_eq!(
        curl(&bed, &client, &format!("http://{ip}/")).unwrap(),
        "web-1"
    );

    bed.stop_agent(false).unwrap();
    bed.start_agent().unwrap();
    for node in 0..2 {
        assert_eq!(
            cluster_ip(&bed, node, "zzz").as_ref(),
            Some(&ip),
            "node {node}"
        );
        assert_eq!(cluster_ip(&bed, node, "aaa"), None, "node {node}");
    }
    assert_eq!(
        curl(&bed, &client, &format!("http://{ip}/")).unwrap(),
        "web-1"
    );
}
