//! Whole behaviour across two simulated nodes joined by a LAN, each with its own agent:
//! clients on node 1 (index 0), backends on node 2 (index 1) unless a test says otherwise.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

mod support;

use xtask::testbed::{Pod, Testbed, wait_for};

fn two_nodes() -> Testbed {
    support::bed::testbed(2)
}

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
const VIP: &str = "198.19.0.10";

fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, i)
}

/// A Pod manifest; `extra_meta` and `status` add lines to metadata and status.
fn pod_manifest(name: &str, ip: Ipv4Addr, extra_meta: &str, status: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: web}}\n{extra_meta}spec:\n  containers: [{{name: server, image: example}}]\nstatus:\n  podIP: {ip}\n{status}"
    )
}

const NOT_READY: &str = "  conditions: [{type: Ready, status: \"False\"}]\n";
const DELETING: &str = "  deletionTimestamp: \"2026-01-01T00:00:00Z\"\n";

/// The `web` Service: TCP 80 -> 8080 (HTTP) and 7 -> 7000 (line echo), UDP 53 -> 5353.
fn web_service(extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  clusterIP: {VIP}\n  selector: {{app: web}}\n{extra_spec}  ports:\n  - {{name: http, port: 80, targetPort: 8080}}\n  - {{name: echo, port: 7, targetPort: 7000}}\n  - {{name: dns, port: 53, targetPort: 5353, protocol: UDP}}\n"
    )
}

/// A client on node 0 and `n` server pods `web-<i>` on `node`, serving HTTP, echo and UDP.
fn web_pods(bed: &mut Testbed, n: u8, node: usize) -> (Pod, Vec<Pod>) {
    let client = bed.add_pod_on(0, "client", CLIENT_IP).unwrap();
    let mut servers = Vec::new();
    for i in 1..=n {
        let name = format!("web-{i}");
        let pod = bed.add_pod_on(node, &name, backend_ip(i)).unwrap();
        bed.serve_http(&pod, 8080).unwrap();
        bed.serve_echo(&pod, 7000).unwrap();
        bed.serve_udp(&pod, 5353).unwrap();
        bed.write_manifest(
            &format!("{name}.yaml"),
            &pod_manifest(&name, backend_ip(i), "", ""),
        )
        .unwrap();
        servers.push(pod);
    }
    (client, servers)
}

fn curl(bed: &Testbed, client: &Pod, url: &str) -> anyhow::Result<String> {
    Ok(bed
        .curl(client, url, Duration::from_secs(2))?
        .trim()
        .to_string())
}

/// Pod names answering over `count` new connections.
fn spread(bed: &Testbed, client: &Pod, count: usize) -> std::collections::BTreeSet<String> {
    (0..count)
        .map(|_| curl(bed, client, &format!("http://{VIP}/")).expect("curl through the ClusterIP"))
        .collect()
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

/// A TCP connection from `local_port` (SO_REUSEADDR, so the port's TIME_WAIT from an
/// earlier connection does not stop it), opened in the calling thread's namespace within 2 s
/// (before the closing timeout could end the earlier flow's conntrack entries).
fn connect_from(local_port: u16, to: SocketAddr) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd as _;
    let SocketAddr::V4(to) = to else {
        unreachable!("IPv4 only")
    };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor owned here, handed to TcpStream at the end.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        // connect() gives up after this long (a blocking connect honours SO_SNDTIMEO).
        let timeout = libc::timeval {
            tv_sec: 2,
            tv_usec: 0,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        let local = sockaddr(Ipv4Addr::UNSPECIFIED, local_port);
        if libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sockaddr(*to.ip(), to.port());
        if libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}

/// One HTTP request on a connection from `local_port`; the answer's body.
fn http_from(local_port: u16, to: &str) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut stream = connect_from(local_port, to.parse().unwrap())?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .trim()
        .to_string())
}

#[test]
fn a_direct_connection_after_a_service_connection_from_the_same_port_keeps_its_addresses() {
    let mut bed = two_nodes();
    let (client, _) = web_pods(&mut bed, 1, 1);
    bed.write_manifest("svc.yaml", &web_service("")).unwrap();
    bed.start_agent().unwrap();
    let (via_service, direct) = bed
        .in_pod(&client, || {
            let via_service = http_from(41234, &format!("{VIP}:80"));
            // Same client port, straight to the pod: its replies must keep the pod's address.
            let direct = http_from(41234, "198.18.2.1:8080");
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

fn counter(bed: &Testbed, node: usize, name: &str) -> u64 {
    bed.lb_on(node, &["status"])
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
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
