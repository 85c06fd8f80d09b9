//! Side by side on two simulated nodes and a host outside the cluster on their LAN: the
//! outside host sends HTTP to a nodePort of node 0 whose Service's 10 endpoints are addresses
//! of one server pod on node 1 (externalTrafficPolicy Cluster: node 0 sends every connection
//! on to node 1 from its own address, and translates the replies back). Through this
//! project's datapath with XDP on the uplinks and with XDP off (the TC programs do it all),
//! through the rules kube-proxy's iptables mode (legacy and nft back ends) and nftables mode
//! would program on both nodes, and routed straight to the server pod through node 0 both ways
//! (the ceiling: the same path, no Service, no NAT). With 1, 1,000 and 10,000 Services of 10
//! endpoints each, every fourth one a NodePort and the measured one a random one. Load: wrk
//! from the outside host, bounded in connections and time, over new connections and over
//! kept-alive ones.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use xtask::{
    kubeproxy::{ServiceRules, manifest_list, measure_each_mode},
    testbed::{OUTSIDE_IP, Testbed, lan_ip},
    wrk::{self, wanted},
};

const ENDPOINTS: u32 = 10;

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + 1 + i)
}

fn server_ip(k: u32) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, 1 + k as u8)
}

/// Endpoints of the Services not measured: addresses nothing answers on.
fn fake_endpoint(i: u32, k: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 100, 0)) + (i * ENDPOINTS + k) % (150 * 256))
}

/// Every fourth Service has a nodePort (2,500 of the range's 2,768 at 10,000 Services), and
/// so does the measured one, at the top of the range if not already one of them.
fn node_port(i: u32, measured: u32) -> Option<u16> {
    if i.is_multiple_of(4) {
        Some(30000 + (i / 4) as u16)
    } else if i == measured {
        Some(32700)
    } else {
        None
    }
}

fn main() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "run as root (cargo xtask bench --report)"
    );
    let (seconds, scales) = wrk::seconds_and_scales();
    let lb = Path::new(env!("CARGO_BIN_EXE_lb"));
    let mut results = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for &n in &scales {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let measured = (seed >> 33) as u32 % n;
        let measured_port = node_port(measured, measured).expect("the measured one has one");
        eprintln!("== {n} Services, measuring svc-{measured} at nodePort {measured_port}");
        let mut bed = Testbed::with_nodes("lbbench", lb, 2)?;
        bed.for_xdp()?;
        let server = bed.add_pod_on(1, "server", server_ip(0))?;
        for k in 1..ENDPOINTS {
            bed.add_address(&server, server_ip(k))?;
        }
        bed.serve_http_on(&server, 8080, Some(1))?;
        // Node 0 forwards out of the link it received on (the straight route, and kube-proxy's
        // NAT): no ICMP redirects to the outside host, which would take node 0 out of the path.
        for node in 0..2 {
            for conf in ["all", "eth0"] {
                bed.exec_on_node(
                    node,
                    &[
                        "sysctl",
                        "-qw",
                        &format!("net.ipv4.conf.{conf}.send_redirects=0"),
                    ],
                )?;
            }
        }
        // The straight route goes through node 0 both ways, as the NATed flows do.
        bed.exec_outside(&[
            "ip",
            "route",
            "replace",
            &format!("{}/32", server_ip(0)),
            "via",
            &lan_ip(0).to_string(),
        ])?;
        bed.exec_on_node(
            1,
            &[
                "ip",
                "route",
                "replace",
                &format!("{OUTSIDE_IP}/32"),
                "via",
                &lan_ip(0).to_string(),
            ],
        )?;
        let services: Vec<ServiceRules> = (0..n)
            .map(|i| ServiceRules {
                name: format!("svc-{i}"),
                vip: SocketAddrV4::new(vip(i), 80),
                endpoints: (0..ENDPOINTS)
                    .map(|k| {
                        let ip = if i == measured {
                            server_ip(k)
                        } else {
                            fake_endpoint(i, k)
                        };
                        SocketAddrV4::new(ip, 8080)
                    })
                    .collect(),
                node_port: node_port(i, measured),
            })
            .collect();
        let node_port_url = format!("http://{}:{measured_port}/", lan_ip(0));
        let mut measure = |mode: &'static str, url: &str, bed: &Testbed| -> anyhow::Result<()> {
            if !wanted(mode) {
                return Ok(());
            }
            // Each mode starts clean of the connections of the modes before it (see the
            // kube_proxy bench): TIME_WAIT sockets and netfilter's connection table.
            if let Err(e) = bed.exec(&server, &["ss", "-K", "state", "time-wait"]) {
                eprintln!("   server: ss -K state time-wait: {e}");
            }
            if let Err(e) = bed.exec_outside(&["ss", "-K", "state", "time-wait"]) {
                eprintln!("   outside: ss -K state time-wait: {e}");
            }
            for node in 0..2 {
                if let Err(e) = bed.exec_on_node(node, &["conntrack", "-F"]) {
                    eprintln!("   node {node}: conntrack -F: {e}");
                }
            }
            let exec = |args: &[&str]| bed.exec_outside(args);
            results.extend(wrk::measure(&exec, n, mode, url, seconds)?);
            Ok(())
        };

        measure("direct", &format!("http://{}:8080/", server_ip(0)), &bed)?;

        bed.write_manifest("services.json", &manifest_list(&services))?;
        // veth runs XDP in generic mode only (native falls back to it, see the README).
        for (mode, xdp) in [("lb, XDP generic", "generic"), ("lb, XDP off", "off")] {
            if !wanted(mode) {
                continue;
            }
            bed.start_agent_with(&["--xdp-mode", xdp])?;
            bed.wait_services_programmed(n)?;
            // Let the agent finish the work that follows its first sync.
            std::thread::sleep(Duration::from_secs(2));
            measure(mode, &node_port_url, &bed)?;
            bed.stop_agent(false)?;
            bed.reset_datapaths()?;
        }
        // kube-proxy programs every node.
        measure_each_mode(&bed, &services, |mode| measure(mode, &node_port_url, &bed))?;
        drop(bed);
    }
    wrk::write_json("nodeport", &results)
}
