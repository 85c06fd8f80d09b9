//! Cluster DNS served by the agent, asked with dig from a pod: every record type, live changes,
//! truncation and TCP, bad queries, forwarding upstream, and the kube-dns ClusterIP in front.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

mod support;

use xtask::testbed::{GATEWAY, Pod, Testbed, dns_query, wait_for};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// Where the pods find the agent's DNS server: the node's address on their links.
const DNS: &str = "198.18.0.1";
/// The Service in kube-dns's place, whose endpoint is the agent's listener.
const KUBE_DNS: &str = "198.19.0.53";

const KUBE_DNS_SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system}
spec:
  clusterIP: 198.19.0.53
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
---
apiVersion: v1
kind: Endpoints
metadata: {name: kube-dns, namespace: kube-system}
subsets:
- addresses: [{ip: 198.18.0.1}]
  ports:
  - {name: dns, port: 53, protocol: UDP}
  - {name: dns-tcp, port: 53, protocol: TCP}
"#;

/// A node whose agent serves DNS on every address, with a client pod.
fn dns_testbed(extra: &[&str]) -> (Testbed, Pod) {
    let mut bed = support::bed::testbed(1);
    let client = bed.add_pod("client", CLIENT_IP).unwrap();
    bed.write_manifest("kube-dns.yaml", KUBE_DNS_SERVICE)
        .unwrap();
    let mut flags = vec!["--dns-listen", "0.0.0.0:53"];
    flags.extend_from_slice(extra);
    bed.start_agent_with(&flags).unwrap();
    (bed, client)
}

/// What dig printed: the status, the header flags and the records of each section.
#[derive(Debug, Default)]
struct Dig {
    status: String,
    flags: Vec<String>,
    answer: Vec<String>,
    authority: Vec<String>,
    additional: Vec<String>,
}

impl Dig {
    /// The answer records' data, sorted.
    fn data(&self) -> Vec<String> {
        let mut data: Vec<String> = self
            .answer
            .iter()
            .map(|r| r.split_whitespace().skip(4).collect::<Vec<_>>().join(" "))
            .collect();
        data.sort();
        data
    }

    fn has_flag(&self, flag: &str) -> bool {
        self.flags.iter().any(|f| f == flag)
    }
}

/// `dig @server <args>` from `pod`, one try of two seconds.
fn dig(bed: &Testbed, pod: &Pod, server: &str, args: &[&str]) -> Dig {
    let at = format!("@{server}");
    let mut command = vec![
        "dig",
        &at,
        "+tries=1",
        "+time=2",
        "+noall",
        "+comments",
        "+answer",
        "+authority",
        "+additional",
    ];
    command.extend_from_slice(args);
    let out = bed.exec(pod, &command).expect("dig");
    let mut dig = Dig::default();
    let mut section = "";
    for line in out.lines() {
        if let Some(rest) = line.split("status: ").nth(1) {
            dig.status = rest.split(',').next().unwrap_or_default().to_string();
        } else if let Some(rest) = line.strip_prefix(";; flags: ") {
            dig.flags = rest
                .split(';')
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .map(String::from)
                .collect();
        } else if let Some(name) = line
            .strip_prefix(";; ")
            .and_then(|l| l.strip_suffix(" SECTION:"))
        {
            section = match name {
                "ANSWER" => "answer",
                "AUTHORITY" => "authority",
                "ADDITIONAL" => "additional",
                _ => "",
            };
        } else if !line.starts_with(';') && !line.trim().is_empty() {
            let record = line.split_whitespace().collect::<Vec<_>>().join(" ");
            match section {
                "answer" => dig.answer.push(record),
                "authority" => dig.authority.push(record),
                "additional" => dig.additional.push(record),
                _ => {}
            }
        }
    }
    dig
}

fn pod_manifest(name: &str, app: &str, ip: Ipv4Addr, hostname: Option<(&str, &str)>) -> String {
    let host = hostname
        .map(|(h, s)| format!("  hostname: {h}\n  subdomain: {s}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: {app}}}\nspec:\n{host}  containers:\n  - name: c\n    image: example\n    ports: [{{name: sql, containerPort: 5432}}]\nstatus:\n  podIP: {ip}\n"
    )
}

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 198.19.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: 8080}
---
apiVersion: v1
kind: Service
metadata: {name: db}
spec:
  clusterIP: None
  selector: {app: db}
  ports:
  - {name: sql, port: 5432, targetPort: sql}
---
apiVersion: v1
kind: Service
metadata: {name: my-database}
spec:
  type: ExternalName
  externalName: my.database.example.com
"#;

#[test]
fn every_record_type_answers_a_pod_over_udp_and_tcp_directly_and_through_the_kube_dns_cluster_ip() {
    let (bed, client) = dns_testbed(&[]);
    bed.write_manifest("services.yaml", SERVICES).unwrap();
    for (i, hostname) in [Some(("db-0", "db")), Some(("db-1", "elsewhere")), None]
        .into_iter()
        .enumerate()
    {
        let ip = Ipv4Addr::new(198, 18, 2, 1 + i as u8);
        bed.write_manifest(
            &format!("db-{i}.yaml"),
            &pod_manifest(&format!("db-{i}"), "db", ip, hostname),
        )
        .unwrap();
    }
    wait_for(
        "the headless Service's three endpoints",
        Duration::from_secs(5),
        || {
            dig(&bed, &client, DNS, &["db.default.svc.cluster.local"])
                .answer
                .len()
                == 3
        },
    );
    for server in [DNS, KUBE_DNS] {
        for transport in ["+notcp", "+tcp"] {
            let ask = |args: &[&str]| {
                let mut args = args.to_vec();
                args.push(transport);
                dig(&bed, &client, server, &args)
            };
            let context = format!("@{server} {transport}");
            let web = ask(&["web.default.svc.cluster.local"]);
            assert_eq!(web.status, "NOERROR", "{context}");
            assert!(web.has_flag("aa"), "{context}: {web:?}");
            assert_eq!(web.data(), ["198.19.0.10"], "{context}");

            let srv = ask(&["_http._tcp.web.default.svc.cluster.local", "SRV"]);
            assert_eq!(
                srv.data(),
                ["0 100 80 web.default.svc.cluster.local."],
                "{context}"
            );
            assert_eq!(
                srv.additional,
                ["web.default.svc.cluster.local. 5 IN A 198.19.0.10"],
                "{context}"
            );
            assert_eq!(
                ask(&["-x", "198.19.0.10"]).data(),
                ["web.default.svc.cluster.local."],
                "{context}"
            );

            assert_eq!(
                ask(&["db.default.svc.cluster.local"]).data(),
                ["198.18.2.1", "198.18.2.2", "198.18.2.3"],
                "{context}"
            );
            // The hostname where the Pod's subdomain is the Service, else the address.
            assert_eq!(
                ask(&["db-0.db.default.svc.cluster.local"]).data(),
                ["198.18.2.1"],
                "{context}"
            );
            assert_eq!(
                ask(&["db-1.db.default.svc.cluster.local"]).status,
                "NXDOMAIN",
                "{context}"
            );
            assert_eq!(
                ask(&["198-18-2-2.db.default.svc.cluster.local"]).data(),
                ["198.18.2.2"],
                "{context}"
            );
            // SRV targets are the endpoints, at the port the Pods name.
            assert_eq!(
                ask(&["_sql._tcp.db.default.svc.cluster.local", "SRV"]).data(),
                [
                    "0 33 5432 198-18-2-2.db.default.svc.cluster.local.",
                    "0 33 5432 198-18-2-3.db.default.svc.cluster.local.",
                    "0 33 5432 db-0.db.default.svc.cluster.local.",
                ],
                "{context}"
            );
            assert_eq!(
                ask(&["-x", "198.18.2.1"]).data(),
                ["db-0.db.default.svc.cluster.local."],
                "{context}"
            );

            let alias = ask(&["my-database.default.svc.cluster.local"]);
            assert_eq!(alias.status, "NOERROR", "{context}");
            assert_eq!(alias.data(), ["my.database.example.com."], "{context}");
            assert!(alias.answer[0].contains(" CNAME "), "{context}: {alias:?}");

            // NXDOMAIN and NODATA carry the zone's SOA.
            let missing = ask(&["nothing.default.svc.cluster.local"]);
            assert_eq!(missing.status, "NXDOMAIN", "{context}");
            assert!(
                missing.authority[0].starts_with("cluster.local. 5 IN SOA"),
                "{context}: {missing:?}"
            );
            let no_aaaa = ask(&["web.default.svc.cluster.local", "AAAA"]);
            assert_eq!(no_aaaa.status, "NOERROR", "{context}");
            assert!(no_aaaa.answer.is_empty(), "{context}: {no_aaaa:?}");
            assert_eq!(no_aaaa.authority.len(), 1, "{context}");

            // No upstream: names elsewhere are refused.
            assert_eq!(ask(&["example.com"]).status, "REFUSED", "{context}");
        }
    }
}

#[test]
fn answers_follow_services_and_endpoints_within_a_second() {
    let (bed, client) = dns_testbed(&[]);
    let web = |ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  clusterIP: {ip}\n  ports: [{{port: 80}}]\n"
        )
    };
    let name = "web.default.svc.cluster.local";
    let within_a_second = |what: &str, expected: &[&str]| {
        let started = Instant::now();
        loop {
            let answer = dig(&bed, &client, DNS, &[name]);
            if answer.data() == expected {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "{what}: still {answer:?} after a second"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert_eq!(dig(&bed, &client, DNS, &[name]).status, "NXDOMAIN");
    bed.write_manifest("web.yaml", &web("198.19.0.10")).unwrap();
    within_a_second("a new Service", &["198.19.0.10"]);
    bed.write_manifest("web.yaml", &web("198.19.0.11")).unwrap();
    within_a_second("a Service at another address", &["198.19.0.11"]);
    bed.remove_manifest("web.yaml").unwrap();
    within_a_second("a Service removed", &[]);
    assert_eq!(dig(&bed, &client, DNS, &[name]).status, "NXDOMAIN");

    // Endpoints of a headless Service come and go, and so does readiness.
    bed.write_manifest(
        "db.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {clusterIP: None, selector: {app: db}}\n",
    )
    .unwrap();
    let name = "db.default.svc.cluster.local";
    let endpoints = |expected: &[&str]| {
        let started = Instant::now();
        loop {
            let answer = dig(&bed, &client, DNS, &[name]);
            if answer.status == "NOERROR" && answer.data() == expected {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(1),
                "still {answer:?} after a second, expected {expected:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    endpoints(&[]);
    let pod = pod_manifest("db-0", "db", Ipv4Addr::new(198, 18, 2, 1), None);
    bed.write_manifest("db-0.yaml", &pod).unwrap();
    endpoints(&["198.18.2.1"]);
    let not_ready = format!("{pod}  conditions: [{{type: Ready, status: \"False\"}}]\n");
    bed.write_manifest("db-0.yaml", &not_ready).unwrap();
    endpoints(&[]);
}

#[test]
fn sixty_endpoints_set_the_truncation_bit_over_udp_and_come_whole_over_tcp() {
    let (bed, client) = dns_testbed(&[]);
    let mut manifest = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: many}\nspec: {clusterIP: None}\n---\napiVersion: v1\nkind: Endpoints\nmetadata: {name: many}\nsubsets:\n- addresses:\n",
    );
    for i in 1..=60 {
        manifest.push_str(&format!("  - ip: 198.18.3.{i}\n"));
    }
    bed.write_manifest("many.yaml", &manifest).unwrap();
    let name = "many.default.svc.cluster.local";
    wait_for("the 60 endpoints", Duration::from_secs(5), || {
        dig(&bed, &client, DNS, &["+tcp", name]).answer.len() == 60
    });
    // 60 records do not fit a 512-byte message: the answer says so and holds what fits.
    let udp = dig(&bed, &client, DNS, &["+noedns", "+ignore", name]);
    assert!(udp.has_flag("tc"), "{udp:?}");
    assert!(udp.answer.len() < 60, "{udp:?}");
    // dig retries over TCP on its own, as resolvers do.
    let retried = dig(&bed, &client, DNS, &["+noedns", name]);
    assert_eq!(retried.answer.len(), 60);
    assert!(!retried.has_flag("tc"));
    // EDNS with room enough: whole over UDP.
    let edns = dig(&bed, &client, DNS, &["+bufsize=4096", "+ignore", name]);
    assert_eq!(edns.answer.len(), 60, "{edns:?}");
    assert!(!edns.has_flag("tc"));
}

/// The answer's ID and response code, if one comes within a second.
fn exchange(socket: &UdpSocket, message: &[u8]) -> Option<(u16, u8)> {
    socket.send(message).ok()?;
    let mut buffer = [0u8; 4096];
    let n = socket.recv(&mut buffer).ok()?;
    (n >= 12).then(|| (u16::from_be_bytes([buffer[0], buffer[1]]), buffer[3] & 0xf))
}

const FORMERR: u8 = 1;
const NOTIMP: u8 = 4;

#[test]
fn malformed_and_oversized_queries_get_formerr_or_nothing_and_the_server_keeps_serving() {
    let (bed, client) = dns_testbed(&[]);
    bed.write_manifest(
        "web.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 198.19.0.10, ports: [{port: 80}]}\n",
    )
    .unwrap();
    wait_for("the Service's name", Duration::from_secs(5), || {
        dig(&bed, &client, DNS, &["web.default.svc.cluster.local"]).status == "NOERROR"
    });
    let server: SocketAddr = (GATEWAY, 53).into();
    let results = bed
        .in_pod(&client, move || {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket.connect(server).unwrap();
            socket
                .set_read_timeout(Some(Duration::from_secs(1)))
                .unwrap();
            let good = dns_query(7, "web.default.svc.cluster.local");
            // A question cut short: the header is readable, the rest is not.
            let cut = good[..good.len() - 3].to_vec();
            // A label running past the end of the message.
            let mut overrun = good[..12].to_vec();
            overrun.extend_from_slice(&[60, b'a', b'b']);
            // Two questions: this server answers one.
            let mut two = dns_query(9, "web.default.svc.cluster.local");
            two[5] = 2;
            two.extend_from_slice(&good[12..]);
            // An UPDATE.
            let mut update = dns_query(10, "web.default.svc.cluster.local");
            update[2] = 5 << 3;
            // 60 KB: a question followed by garbage.
            let mut oversized = dns_query(11, "web.default.svc.cluster.local");
            oversized.extend(std::iter::repeat_n(0xa5, 60_000));
            let mut seed = 0x1234_5678_u32;
            let mut random = || {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed
            };
            let junk: Vec<Vec<u8>> = (0..50)
                .map(|i| (0..(i * 7 % 300)).map(|_| random() as u8).collect())
                .collect();
            let mut results = vec![
                ("cut", exchange(&socket, &cut)),
                ("overrun", exchange(&socket, &overrun)),
                ("two questions", exchange(&socket, &two)),
                ("update", exchange(&socket, &update)),
                ("oversized", exchange(&socket, &oversized)),
            ];
            for message in &junk {
                let _ = socket.send(message);
            }
            // Whatever the junk got, the server still answers.
            std::thread::sleep(Duration::from_millis(200));
            let mut buffer = [0u8; 4096];
            socket.set_nonblocking(true).unwrap();
            while socket.recv(&mut buffer).is_ok() {}
            socket.set_nonblocking(false).unwrap();
            results.push(("after the junk", exchange(&socket, &good)));
            // TCP: a length prefix promising more than comes, then the connection closes.
            let mut stream = TcpStream::connect(server).unwrap();
            stream.write_all(&[0xff, 0xff, 1, 2, 3]).unwrap();
            drop(stream);
            let mut stream = TcpStream::connect(server).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(1)))
                .unwrap();
            let mut framed = (good.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&good);
            stream.write_all(&framed).unwrap();
            let mut answer = [0u8; 2];
            let tcp = stream.read_exact(&mut answer).is_ok();
            (results, tcp)
        })
        .unwrap();
    let (results, tcp) = results;
    let by_name = |name: &str| results.iter().find(|(n, _)| *n == name).unwrap().1;
    assert_eq!(by_name("cut"), Some((7, FORMERR)));
    assert_eq!(by_name("overrun"), Some((7, FORMERR)));
    assert_eq!(by_name("two questions"), Some((9, FORMERR)));
    assert_eq!(by_name("update"), Some((10, NOTIMP)));
    // Bytes after the question: ignored (the question is answered), or FORMERR.
    assert!(
        matches!(by_name("oversized"), Some((11, FORMERR | 0))),
        "{results:?}"
    );
    assert_eq!(by_name("after the junk"), Some((7, 0)), "{results:?}");
    assert!(tcp, "no answer over TCP after a broken connection");
    assert_eq!(
        dig(&bed, &client, DNS, &["web.default.svc.cluster.local"]).data(),
        ["198.19.0.10"]
    );
}

#[test]
fn names_outside_the_cluster_domain_go_to_the_upstream_server_over_udp_and_tcp() {
    let upstream_ip = Ipv4Addr::new(198, 18, 4, 53);
    let mut bed = support::bed::testbed(1);
    let client = bed.add_pod("client", CLIENT_IP).unwrap();
    let upstream = bed.add_pod("upstream", upstream_ip).unwrap();
    bed.serve_dns_stub(&upstream, 53, Ipv4Addr::new(198, 18, 4, 4))
        .unwrap();
    bed.write_manifest("kube-dns.yaml", KUBE_DNS_SERVICE)
        .unwrap();
    bed.start_agent_with(&[
        "--dns-listen",
        "0.0.0.0:53",
        "--dns-upstream",
        &upstream_ip.to_string(),
        "--cluster-domain",
        "example.internal",
        "--dns-ttl",
        "30s",
    ])
    .unwrap();
    for transport in ["+notcp", "+tcp"] {
        let outside = dig(&bed, &client, DNS, &["www.example.com", transport]);
        assert_eq!(outside.status, "NOERROR", "{transport}: {outside:?}");
        assert_eq!(outside.data(), ["198.18.4.4"], "{transport}");
        assert!(outside.has_flag("ra"), "{transport}: {outside:?}");
        assert!(!outside.has_flag("aa"), "{transport}: {outside:?}");
        // The cluster's own names stay here, under the domain given.
        let kube_dns = dig(
            &bed,
            &client,
            KUBE_DNS,
            &["kube-dns.kube-system.svc.example.internal", transport],
        );
        assert_eq!(
            kube_dns.answer,
            ["kube-dns.kube-system.svc.example.internal. 30 IN A 198.19.0.53"],
            "{transport}"
        );
        // cluster.local is just another name elsewhere now.
        assert_eq!(
            dig(
                &bed,
                &client,
                DNS,
                &["kube-dns.kube-system.svc.cluster.local", transport]
            )
            .data(),
            ["198.18.4.4"]
        );
    }
}

#[test]
fn in_cluster_mode_names_come_from_the_api_servers_services_and_endpoint_slices() {
    use serde_json::json;
    let mut bed = support::bed::testbed(1);
    let client = bed.add_pod("client", CLIENT_IP).unwrap();
    let listener = bed
        .listen_on_node(0, "127.0.0.1:16443".parse().unwrap())
        .unwrap();
    let api = support::apiserver::FakeApiServer::start(listener);
    let service = |name: &str, spec: serde_json::Value| {
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": name, "namespace": "default"}, "spec": spec})
    };
    api.apply(service(
        "web",
        json!({"clusterIP": "198.19.0.10", "ports": [{"name": "http", "port": 80}]}),
    ));
    api.apply(service(
        "db",
        json!({"clusterIP": "None", "ports": [{"name": "sql", "port": 5432}]}),
    ));
    api.apply(service(
        "my-database",
        json!({"type": "ExternalName", "externalName": "my.database.example.com"}),
    ));
    // Another proxy's Service: not in this datapath, but named, as CoreDNS names it.
    let mut other = service(
        "other-proxy",
        json!({"clusterIP": "198.19.0.12", "ports": [{"name": "http", "port": 80}]}),
    );
    other["metadata"]["labels"] = json!({"service.kubernetes.io/service-proxy-name": "other"});
    api.apply(other);
    api.apply(json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "db-abcde", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "db"}},
        "addressType": "IPv4",
        "endpoints": [
            {"addresses": ["198.18.2.1"], "hostname": "db-0", "conditions": {"ready": true}},
            {"addresses": ["198.18.2.2"], "conditions": {"ready": false}},
        ],
        "ports": [{"name": "sql", "port": 15432, "protocol": "TCP"}]
    }));
    bed.kubeconfig = Some(api.write_kubeconfig(&bed.dir));
    bed.start_agent_with(&["--dns-listen", "0.0.0.0:53"])
        .unwrap();
    wait_for("the API server's Services", Duration::from_secs(20), || {
        dig(&bed, &client, DNS, &["web.default.svc.cluster.local"]).data() == ["198.19.0.10"]
    });
    // Only the ready endpoint, under the hostname its slice gives.
    assert_eq!(
        dig(&bed, &client, DNS, &["db.default.svc.cluster.local"]).data(),
        ["198.18.2.1"]
    );
    assert_eq!(
        dig(&bed, &client, DNS, &["db-0.db.default.svc.cluster.local"]).data(),
        ["198.18.2.1"]
    );
    assert_eq!(
        dig(
            &bed,
            &client,
            DNS,
            &["_sql._tcp.db.default.svc.cluster.local", "SRV"]
        )
        .data(),
        ["0 100 15432 db-0.db.default.svc.cluster.local."]
    );
    assert_eq!(
        dig(
            &bed,
            &client,
            DNS,
            &["my-database.default.svc.cluster.local"]
        )
        .data(),
        ["my.database.example.com."]
    );
    assert_eq!(
        dig(
            &bed,
            &client,
            DNS,
            &["other-proxy.default.svc.cluster.local"]
        )
        .data(),
        ["198.19.0.12"]
    );
    let listed = bed.lb(&["get", "svc"]).unwrap();
    assert!(!listed.contains("other-proxy"), "{listed}");
    // A change through the API server is answered within a second.
    api.apply(service(
        "web",
        json!({"clusterIP": "198.19.0.11", "ports": [{"name": "http", "port": 80}]}),
    ));
    let started = Instant::now();
    while dig(&bed, &client, DNS, &["web.default.svc.cluster.local"]).data() != ["198.19.0.11"] {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the new address not answered within a second"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
