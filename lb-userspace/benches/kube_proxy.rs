//! Side by side on two simulated nodes: a client pod on node 0 sends HTTP to a ClusterIP
//! whose 10 endpoints are addresses of one server pod on node 1, through this project's
//! datapath, through the rules kube-proxy's iptables mode (legacy and nft back ends) and
//! nftables mode would program on the client's node, and directly to the server (the
//! ceiling), with 1, 1,000 and 10,000 Services of 10 endpoints each, the measured Service a
//! random one. Every request and reply crosses the link between the nodes, as in a cluster
//! where the backend runs elsewhere. Load: wrk, bounded in connections and time, over new
//! connections (`Connection: close`) and over kept-alive connections. `lb, connect-time`: the
//! same client in the cgroup the agent attached its socket programs to, so its connect()
//! goes to the backend at once and no packet is translated.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use xtask::{
    kubeproxy::{ServiceRules, manifest_list, measure_each_mode},
    testbed::Testbed,
    wrk::{self, wanted},
};

const ENDPOINTS: u32 = 10;
/// The mode whose client is in the cgroup of the socket programs.
const CONNECT_TIME: &str = "lb, connect-time";
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);

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

fn main() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "run as root (cargo xtask bench)"
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
        eprintln!(
            "== {n} Services, measuring svc-{measured} at {}",
            vip(measured)
        );
        let mut bed = Testbed::with_nodes("lbbench", lb, 2)?;
        let client = bed.add_pod_on(0, "client", CLIENT_IP)?;
        let server = bed.add_pod_on(1, "server", server_ip(0))?;
        for k in 1..ENDPOINTS {
            bed.add_address(&server, server_ip(k))?;
        }
        bed.serve_http_on(&server, 8080, Some(1))?;
        let services: Vec<ServiceRules> = (0..n)
            .map(|i| ServiceRules {
                name: format!("svc-{i}"),
                vip: SocketAddrV4::new(vip(i), 80),
                endpoints: (0..ENDPOINTS)
                    .map(|k| {
                        SocketAddrV4::new(
                            if i == measured {
                                server_ip(k)
                            } else {
                                fake_endpoint(i, k)
                            },
                            8080,
                        )
                    })
                    .collect(),
                node_port: None,
            })
            .collect();
        let service_url = format!("http://{}/", vip(measured));
        // The client's node's agent attaches its socket programs to a cgroup of its own;
        // the client joins it only for the connect-time mode.
        bed.enable_socket_lb()?;
        let mut measure = |mode: &'static str, url: &str, bed: &Testbed| -> anyhow::Result<()> {
            if !wanted(mode) {
                return Ok(());
            }
            // Each mode starts clean of the connections of the modes before it. The server
            // keeps closed connections in TIME_WAIT for 60 s; a SYN that reuses one's address
            // pair with timestamps from another path (direct: the client's clock offset for the
            // server's address; a Service: for the ClusterIP) looks old, is answered with an
            // ACK instead of a SYN-ACK, and only its retransmission 1 s later gets through.
            // Netfilter's connection table likewise keeps a previous mode's entries 120 s.
            for (pod, what) in [(&server, "server"), (&client, "client")] {
                if let Err(e) = bed.exec(pod, &["ss", "-K", "state", "time-wait"]) {
                    eprintln!("   {what}: ss -K state time-wait: {e}");
                }
            }
            for node in 0..2 {
                if let Err(e) = bed.exec_on_node(node, &["conntrack", "-F"]) {
                    eprintln!("   node {node}: conntrack -F: {e}");
                }
            }
            let in_cgroup = mode == CONNECT_TIME;
            let exec = |args: &[&str]| {
                if in_cgroup {
                    bed.exec_pod_in_cgroup(&client, args)
                } else {
                    bed.exec(&client, args)
                }
            };
            results.extend(wrk::measure(&exec, n, mode, url, seconds)?);
            Ok(())
        };

        measure("direct", &format!("http://{}:8080/", server_ip(0)), &bed)?;

        bed.write_manifest("services.json", &manifest_list(&services))?;
        bed.start_agent()?;
        bed.wait_services_programmed(n)?;
        // Let the agent finish the work that follows its first sync.
        std::thread::sleep(Duration::from_secs(2));
        measure("lb (eBPF)", &service_url, &bed)?;
        measure(CONNECT_TIME, &service_url, &bed)?;
        // The same datapath with the agent stopped (programs stay attached): what the agent's
        // own work costs the traffic.
        bed.stop_agent(false)?;
        measure("lb, agent stopped", &service_url, &bed)?;
        bed.reset_datapaths()?;
        // kube-proxy programs every node.
        measure_each_mode(&bed, &services, |mode| measure(mode, &service_url, &bed))?;
        drop(bed);
    }
    wrk::write_json("kube-proxy", &results)
}
