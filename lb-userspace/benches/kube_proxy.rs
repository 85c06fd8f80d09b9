//! Side by side on two simulated nodes: a client pod on node 0 sends HTTP to a ClusterIP
//! whose 10 endpoints are addresses of one server pod on node 1, through this project's
//! datapath, through the rules kube-proxy's iptables mode (legacy and nft back ends) and
//! nftables mode would program on the client's node, and directly to the server (the
//! ceiling), with 1, 1,000 and 10,000 Services of 10 endpoints each, the measured Service a
//! random one. Every request and reply crosses the link between the nodes, as in a cluster
//! where the backend runs elsewhere. Load: wrk, bounded in connections and time, over new
//! connections (`Connection: close`) and over kept-alive connections.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::{Duration, Instant},
};

use serde::Serialize;
use xtask::{
    kubeproxy::{ServiceRules, iptables_restore, nft_ruleset},
    testbed::{Pod, Testbed},
};

const ENDPOINTS: u32 = 10;
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

#[derive(Serialize, Clone)]
struct Measurement {
    services: u32,
    mode: &'static str,
    workload: &'static str,
    requests_per_second: f64,
    p50_us: f64,
    p99_us: f64,
    /// Every run, slowest first; the figures above are the median run's.
    runs_requests_per_second: Vec<f64>,
    /// SYNs the client had to send again over all runs: each is a connection that waited a
    /// retransmission timeout (1 s) because its first SYN got no answer.
    client_syn_retransmits: u64,
}

/// Runs of each workload per mode.
const RUNS: usize = 3;

struct Wrk {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
}

fn duration_us(text: &str) -> Option<f64> {
    let (number, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = number.parse().ok()?;
    Some(match unit {
        "us" => n,
        "ms" => n * 1e3,
        "s" => n * 1e6,
        _ => return None,
    })
}

fn parse_wrk(out: &str) -> anyhow::Result<Wrk> {
    let find = |prefix: &str| {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|r| r.trim().to_string()))
    };
    let rps = find("Requests/sec:").and_then(|v| v.parse().ok());
    let p50 = find("50%").and_then(|v| duration_us(&v));
    let p99 = find("99%").and_then(|v| duration_us(&v));
    match (rps, p50, p99) {
        (Some(rps), Some(p50_us), Some(p99_us)) => Ok(Wrk {
            rps,
            p50_us,
            p99_us,
        }),
        _ => anyhow::bail!("cannot read wrk output:\n{out}"),
    }
}

/// The client's SYN retransmissions so far (its namespace's counter).
fn syn_retransmits(bed: &Testbed, client: &Pod) -> u64 {
    bed.exec(client, &["nstat", "-az", "TcpExtTCPSynRetrans"])
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("TcpExtTCPSynRetrans"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn wrk(
    bed: &Testbed,
    client: &Pod,
    url: &str,
    new_connections: bool,
    seconds: u64,
) -> anyhow::Result<Wrk> {
    let secs = format!("{seconds}s");
    // wrk on CPU 0, the server on CPU 1: neither steals the other's core.
    let mut args = vec![
        "taskset",
        "-c",
        "0",
        "wrk",
        "-t1",
        "-c8",
        "-d",
        &secs,
        "--latency",
        "--timeout",
        "2s",
    ];
    if new_connections {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(url);
    parse_wrk(&bed.exec(client, &args)?)
}

/// BENCH_MODES (comma-separated, e.g. `direct,lb`) limits the modes measured.
fn wanted(mode: &str) -> bool {
    std::env::var("BENCH_MODES").map_or(true, |modes| {
        modes.split(',').any(|m| mode.starts_with(m.trim()))
    })
}

fn main() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    anyhow::ensure!(
        unsafe { libc::geteuid() } == 0,
        "run as root (cargo xtask bench)"
    );
    let seconds: u64 = std::env::var("BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let scales: Vec<u32> = std::env::var("BENCH_SCALES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 1_000, 10_000]);
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
            })
            .collect();
        let service_url = format!("http://{}/", vip(measured));
        let mut measure = |mode: &'static str, url: &str, bed: &Testbed| -> anyhow::Result<()> {
            if !wanted(mode) {
                return Ok(());
            }
            // The two workloads take turns, so that a slow spell of this shared machine
            // falls on both; each figure is the median run by requests per second.
            let workloads = [("new connections", true), ("kept-alive", false)];
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
            let mut runs: Vec<Vec<Wrk>> = vec![Vec::new(), Vec::new()];
            let mut retransmits = [0u64; 2];
            for _ in 0..RUNS {
                for (i, (_, new_connections)) in workloads.iter().enumerate() {
                    let before = syn_retransmits(bed, &client);
                    runs[i].push(wrk(bed, &client, url, *new_connections, seconds)?);
                    retransmits[i] += syn_retransmits(bed, &client) - before;
                }
            }
            for (((workload, _), mut runs), retransmits) in
                workloads.into_iter().zip(runs).zip(retransmits)
            {
                runs.sort_by(|a, b| a.rps.total_cmp(&b.rps));
                let spread = runs
                    .iter()
                    .map(|w| format!("{:.0}", w.rps))
                    .collect::<Vec<_>>();
                let w = &runs[runs.len() / 2];
                eprintln!(
                    "   {mode:<18} {workload:<16} {:>9.0} req/s  p50 {:>7.0} us  p99 {:>7.0} us  (runs: {}; SYN retransmits: {retransmits})",
                    w.rps,
                    w.p50_us,
                    w.p99_us,
                    spread.join(", ")
                );
                results.push(Measurement {
                    services: n,
                    mode,
                    workload,
                    requests_per_second: w.rps,
                    p50_us: w.p50_us,
                    p99_us: w.p99_us,
                    runs_requests_per_second: runs.iter().map(|w| w.rps).collect(),
                    client_syn_retransmits: retransmits,
                });
            }
            Ok(())
        };

        measure("direct", &format!("http://{}:8080/", server_ip(0)), &bed)?;

        write_manifests(&bed, &services)?;
        bed.start_agent()?;
        wait_programmed(&bed, n)?;
        // Let the agent finish the work that follows its first sync.
        std::thread::sleep(Duration::from_secs(2));
        measure("lb (eBPF)", &service_url, &bed)?;
        // The same datapath with the agent stopped (programs stay attached): what the agent's
        // own work costs the traffic.
        bed.stop_agent(false)?;
        measure("lb, agent stopped", &service_url, &bed)?;
        for node in 0..2 {
            bed.lb_on(
                node,
                &["reset", "--bpffs", &bed.bpffs_of(node).to_string_lossy()],
            )?;
        }
        // kube-proxy programs every node: the server's node sees each new connection too.
        let on_both = |args: &[&str]| -> anyhow::Result<()> {
            for node in 0..2 {
                bed.exec_on_node(node, args)?;
            }
            Ok(())
        };

        let rules_file = bed.dir.join("rules");
        std::fs::write(&rules_file, iptables_restore(&services))?;
        let rules = rules_file.to_string_lossy().into_owned();
        for (mode, restore, flush) in [
            (
                "iptables-legacy",
                "iptables-legacy-restore",
                "iptables-legacy",
            ),
            ("iptables-nft", "iptables-nft-restore", "iptables-nft"),
        ] {
            if !wanted(mode) {
                continue;
            }
            let started = Instant::now();
            on_both(&[restore, &rules])?;
            eprintln!("   {mode}: rules loaded in {:.1?}", started.elapsed());
            measure(mode, &service_url, &bed)?;
            on_both(&[flush, "-t", "nat", "-F"])?;
            on_both(&[flush, "-t", "nat", "-X"])?;
        }
        if wanted("nftables") {
            std::fs::write(&rules_file, nft_ruleset(&services))?;
            let started = Instant::now();
            on_both(&["nft", "-f", &rules])?;
            eprintln!("   nftables: rules loaded in {:.1?}", started.elapsed());
            measure("nftables", &service_url, &bed)?;
            on_both(&["nft", "flush", "ruleset"])?;
        }
        drop(bed);
    }
    let text = serde_json::to_string_pretty(
        &serde_json::json!({"machine": xtask::machine::Machine::read(), "rows": results}),
    )?;
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("kube-proxy.json"), &text)?;
    println!("{text}");
    Ok(())
}

fn write_manifests(bed: &Testbed, services: &[ServiceRules]) -> anyhow::Result<()> {
    let mut items = Vec::new();
    for s in services {
        items.push(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": s.name},
            "spec": {"clusterIP": s.vip.ip().to_string(), "ports": [{"port": s.vip.port(), "targetPort": 8080}]}
        }));
        items.push(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("{}-abcde", s.name), "labels": {"kubernetes.io/service-name": s.name}},
            "addressType": "IPv4",
            "endpoints": s.endpoints.iter().map(|e| serde_json::json!({"addresses": [e.ip().to_string()]})).collect::<Vec<_>>(),
            "ports": [{"port": 8080}]
        }));
    }
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
    bed.write_manifest("services.json", &list.to_string())
}

fn wait_programmed(bed: &Testbed, n: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !bed
        .exec_node(&["curl", "-sS", "http://127.0.0.1:10249/metrics"])
        .unwrap_or_default()
        .contains(&format!("lb_services {n}\n"))
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "agent did not program {n} services"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
