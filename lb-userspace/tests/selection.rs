//! How new connections pick their pod, with real sockets across two simulated nodes: ClientIP
//! session affinity, and Maglev consistent hashing (clients on node 1, index 0, pods on
//! node 2, index 1, unless a test says otherwise).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

mod support;

use support::web::*;
use xtask::testbed::{Pod, Testbed, wait_for};

fn two_nodes() -> Testbed {
    support::bed::testbed(2)
}

/// The `web` Service with `sessionAffinity: ClientIP` (and this timeout, if given).
fn sticky_service(timeout_s: Option<u32>) -> String {
    let config = timeout_s.map_or(String::new(), |t| {
        format!("  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {t}}}}}\n")
    });
    web_service(&format!("  sessionAffinity: ClientIP\n{config}"))
}

/// Client addresses on the client pod besides its own: each is a client of its own to
/// affinity.
fn client_addresses(bed: &Testbed, client: &Pod, n: u8) -> Vec<Ipv4Addr> {
    (0..n)
        .map(|i| {
            let ip = Ipv4Addr::new(198, 18, 1, 100 + i);
            bed.add_address(client, ip).unwrap();
            ip
        })
        .collect()
}

/// The pod answering an HTTP request through the ClusterIP from `ip` (any port).
fn answer_from(bed: &Testbed, client: &Pod, ip: Ipv4Addr) -> String {
    let vip = format!("{VIP}:80");
    bed.in_pod(client, move || http_from(SocketAddrV4::new(ip, 0), &vip))
        .unwrap()
        .expect("HTTP through the ClusterIP")
}

/// The pod each client address lands on, checking that `per_client` connections all agree.
fn landings(
    bed: &Testbed,
    client: &Pod,
    ips: &[Ipv4Addr],
    per_client: usize,
) -> BTreeMap<Ipv4Addr, String> {
    ips.iter()
        .map(|ip| {
            let pods: BTreeSet<String> = (0..per_client)
                .map(|_| answer_from(bed, client, *ip))
                .collect();
            assert_eq!(pods.len(), 1, "client {ip} went to {pods:?}");
            (*ip, pods.into_iter().next().unwrap())
        })
        .collect()
}

#[test]
fn client_ip_affinity_keeps_each_client_on_one_pod() {
    let mut bed = two_nodes();
    let (client, _) = web_pods(&mut bed, 4, 1);
    bed.write_manifest("svc.yaml", &sticky_service(None))
        .unwrap();
    bed.start_agent().unwrap();

    // Kubernetes' conformance check: many connections from one client, one pod.
    let pods = spread(&bed, &client, 50);
    assert_eq!(pods.len(), 1, "50 connections from one client: {pods:?}");
    // Other clients may land elsewhere: 8 clients on one of 4 pods has probability 4^-7.
    let ips = client_addresses(&bed, &client, 8);
    let landed = landings(&bed, &client, &ips, 5);
    let used: BTreeSet<_> = landed.values().collect();
    assert!(used.len() > 1, "every client on one pod: {landed:?}");

    // The entries are in a pinned map bpftool reads (with BTF: field names).
    // (From the host: `ip netns exec` would hide the bpf filesystem.)
    let pin = bed.bpffs_of(0).join(lb_common::AFFINITY_MAP);
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(&pin)
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        dump.contains("\"client\"") && dump.contains("\"last_used_ns\""),
        "{dump}"
    );
    assert_eq!(dump.matches("\"backend_id\"").count(), 9, "{dump}");
}

#[test]
fn a_short_affinity_timeout_expires_and_switching_affinity_off_spreads_again() {
    let mut bed = two_nodes();
    let (client, _) = web_pods(&mut bed, 4, 1);
    bed.write_manifest("svc.yaml", &sticky_service(Some(2)))
        .unwrap();
    bed.start_agent().unwrap();
    let ips = client_addresses(&bed, &client, 8);
    let first = landings(&bed, &client, &ips, 3);
    // Within the timeout of each client's last connection: kept.
    std::thread::sleep(Duration::from_millis(1_000));
    assert_eq!(landings(&bed, &client, &ips, 1), first);
    // Idle past it: a new pick. All 8 the same again has probability 4^-8.
    std::thread::sleep(Duration::from_millis(2_600));
    let after = landings(&bed, &client, &ips, 1);
    assert_ne!(after, first, "affinity outlived its 2 s timeout");

    // Affinity off: one client's connections spread again, at once.
    bed.write_manifest("svc.yaml", &web_service("")).unwrap();
    wait_for("connections to spread", Duration::from_secs(5), || {
        spread(&bed, &client, 20).len() > 1
    });
    assert!(spread(&bed, &client, 40).len() >= 3);
}

#[test]
fn a_client_pinned_to_a_pod_that_turns_not_ready_moves_to_a_ready_one() {
    let mut bed = two_nodes();
    let (client, _) = web_pods(&mut bed, 3, 1);
    bed.write_manifest("svc.yaml", &sticky_service(None))
        .unwrap();
    bed.start_agent().unwrap();
    let pinned = landings(&bed, &client, &[CLIENT_IP], 10)[&CLIENT_IP].clone();
    let index: u8 = pinned.trim_start_matches("web-").parse().unwrap();
    bed.write_manifest(
        &format!("{pinned}.yaml"),
        &pod_manifest(&pinned, backend_ip(index), "", NOT_READY),
    )
    .unwrap();
    let gone = SocketAddrV4::new(backend_ip(index), 8080);
    wait_for(
        "the pod to leave the endpoints",
        Duration::from_secs(5),
        || endpoint_gone(&bed, 0, gone),
    );
    // The maps are written right after the endpoints change.
    std::thread::sleep(Duration::from_millis(300));
    let moved = landings(&bed, &client, &[CLIENT_IP], 20)[&CLIENT_IP].clone();
    assert_ne!(moved, pinned);
}

/// The pod's address from its name (`web-<i>`).
fn pod_address(name: &str) -> SocketAddrV4 {
    let i: u8 = name.trim_start_matches("web-").parse().unwrap();
    SocketAddrV4::new(backend_ip(i), 8080)
}

/// Each flow's pod, from fixed source ports of `from`, opened in `pod`.
fn flow_landings(
    bed: &Testbed,
    pod: &Pod,
    from: Ipv4Addr,
    ports: std::ops::Range<u16>,
) -> Vec<SocketAddrV4> {
    let vip = format!("{VIP}:80");
    bed.in_pod(pod, move || {
        ports
            .map(|p| {
                let name = http_from(SocketAddrV4::new(from, p), &vip)
                    .unwrap_or_else(|e| panic!("from port {p}: {e}"));
                pod_address(&name)
            })
            .collect::<Vec<_>>()
    })
    .unwrap()
}

#[test]
fn maglev_gives_a_flow_the_same_pod_on_every_node_and_keeps_it_when_another_goes() {
    let mut bed = two_nodes();
    let (client_a, servers) = web_pods(&mut bed, 10, 1);
    // A second client, on the pods' node: its node makes its own choices.
    let client_b_ip = Ipv4Addr::new(198, 18, 1, 2);
    let client_b = bed.add_pod_on(1, "client-b", client_b_ip).unwrap();
    bed.write_manifest("svc.yaml", &web_service("")).unwrap();
    bed.start_agent_with(&["--lb-algorithm", "maglev"]).unwrap();
    let size = lb_common::maglev::DEFAULT_TABLE_SIZE;
    let vip = SocketAddrV4::new(VIP.parse().unwrap(), 80);
    let mut endpoints: Vec<SocketAddrV4> = servers.iter().map(|p| pod_address(&p.name)).collect();
    let ports = 42_000..42_060;

    // Each node's choice is the one computed from the endpoints alone: the same 5-tuple gets
    // the same pod whichever node picks it.
    let mut before = Vec::new();
    for (pod, ip) in [(&client_a, CLIENT_IP), (&client_b, client_b_ip)] {
        let landed = flow_landings(&bed, pod, ip, ports.clone());
        for (p, got) in ports.clone().zip(&landed) {
            let expected = maglev_endpoint(&endpoints, size, SocketAddrV4::new(ip, p), vip);
            assert_eq!(*got, expected, "{ip}:{p} on node of {}", pod.name);
        }
        before.push(landed);
    }
    let used: BTreeSet<_> = before.iter().flatten().collect();
    assert!(used.len() >= 8, "flows spread: {used:?}");

    // web-5 goes: its flows move, the others' land where they did (the same 5-tuples as new
    // connections), but for a small share.
    let gone = pod_address("web-5");
    bed.remove_manifest("web-5.yaml").unwrap();
    wait_for(
        "web-5 to leave the endpoints",
        Duration::from_secs(5),
        || (0..2).all(|n| endpoint_gone(&bed, n, gone)),
    );
    // The maps are written right after the endpoints change.
    std::thread::sleep(Duration::from_millis(300));
    endpoints.retain(|e| *e != gone);
    let (mut moved, mut stayed) = (0, 0);
    for ((pod, ip), was) in [(&client_a, CLIENT_IP), (&client_b, client_b_ip)]
        .into_iter()
        .zip(&before)
    {
        let landed = flow_landings(&bed, pod, ip, ports.clone());
        for ((p, got), was) in ports.clone().zip(&landed).zip(was) {
            assert_ne!(*got, gone, "{ip}:{p}");
            let expected = maglev_endpoint(&endpoints, size, SocketAddrV4::new(ip, p), vip);
            assert_eq!(*got, expected, "{ip}:{p} after web-5 went");
            if *was != gone {
                if got == was {
                    stayed += 1;
                } else {
                    moved += 1;
                }
            }
        }
    }
    eprintln!(
        "maglev: after one of 10 pods went, {moved} of {} other flows moved",
        moved + stayed
    );
    assert!(
        moved * 100 <= (moved + stayed) * 5,
        "{moved} of {} moved",
        moved + stayed
    );
}
