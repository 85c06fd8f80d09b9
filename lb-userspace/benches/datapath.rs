//! Per-packet cost of the TC program with BPF_PROG_TEST_RUN, as ns above a program that only
//! returns, with 1, 1,000 and 100,000 Services in the maps.
//!
//! With `repeat` > 1 the kernel reruns the program on the buffer it already rewrote (a DNAT
//! program would time its own output), so every figure comes from single runs (repeat = 1)
//! in a loop, read two ways: the kernel's per-program run-time statistics (run_time_ns /
//! run_cnt, BPF_ENABLE_STATS), and the duration BPF_PROG_TEST_RUN reports for each run.
#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use aya::programs::{TestRun, TestRunOptions};
use lb::dataplane::{TC_EGRESS_PROGRAM, TC_FLOOR_PROGRAM, TC_INGRESS_PROGRAM};
use support::{
    datapath::{TestDatapath, tcp_frontend},
    packet::{TCP, ipv4_frame},
};

const RUNS: usize = 200_000;
const ROUNDS: usize = 5;
/// Distinct new flows per round: both conntrack entries of each fit in the LRU map, so no
/// run pays for eviction.
const NEW_FLOWS: usize = 100_000;

fn service_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + 1 + i)
}

fn backend_addr(i: u32, j: u32) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 256 + 2 * i + j),
        8080,
    )
}

/// ns per run of `frames` (cycled) through `program`, by kernel stats and by test-run duration.
fn time(
    t: &mut TestDatapath,
    program: &'static str,
    frames: &[Vec<u8>],
    runs: usize,
) -> (f64, f64) {
    let prog = t.dp.classifier(program).expect("program");
    let before = prog.info().expect("info");
    let mut out = vec![0u8; 256];
    let mut reported = Duration::ZERO;
    for i in 0..runs {
        let frame = &frames[i % frames.len()];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..Default::default()
        };
        reported += prog.test_run(opts).expect("test run").duration;
    }
    let after = prog.info().expect("info");
    let kernel_runs = (after.run_count() - before.run_count()) as f64;
    let stats = (after.run_time() - before.run_time()).as_nanos() as f64 / kernel_runs;
    (stats, reported.as_nanos() as f64 / runs as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Row {
    services: u32,
    case: &'static str,
    stats: f64,
    loop_: f64,
}

fn main() {
    support::datapath::require_root();
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let mut rows = Vec::new();
    for services in [1u32, 1_000, 100_000] {
        let mut t = TestDatapath::new();
        let mut frontends: Vec<_> = (0..services)
            .map(|i| {
                (
                    tcp_frontend(service_ip(i), 80),
                    vec![backend_addr(i, 0), backend_addr(i, 1)],
                )
            })
            .collect();
        // The measured Service's backends also behind port 8080 = targetPort of another
        // address: then only the address changes.
        let same_port_vip = service_ip(services + 1);
        frontends.push((
            tcp_frontend(same_port_vip, 8080),
            frontends[(services / 2) as usize].1.clone(),
        ));
        t.program(&frontends);
        // The measured Service: one in the middle of the table.
        let target = services / 2;
        let vip = service_ip(target);
        let client = Ipv4Addr::new(198, 18, 255, 1);
        let established = ipv4_frame(TCP, (client, 10000), (vip, 80), b"");
        let backend = {
            let out = t.run(&established);
            let d = support::packet::dst(&out.frame);
            (d.0, d.1)
        };
        let reply = ipv4_frame(TCP, backend, (client, 10000), b"");
        let same_port = ipv4_frame(TCP, (client, 10001), (same_port_vip, 8080), b"");
        t.run(&same_port);
        let other = vec![ipv4_frame(
            TCP,
            (client, 10000),
            (Ipv4Addr::new(198, 18, 254, 254), 80),
            b"",
        )];
        // New flows: every run a 5-tuple not seen before (source ports over several clients).
        let new_flows: Vec<Vec<u8>> = (0..NEW_FLOWS as u32)
            .map(|i| {
                let src = Ipv4Addr::new(198, 18, 200 + (i / 60_000) as u8, 1);
                ipv4_frame(TCP, (src, 1024 + (i % 60_000) as u16), (vip, 80), b"")
            })
            .collect();
        let cases: [(&'static str, &'static str, Vec<Vec<u8>>); 6] = [
            (
                "floor (returns at once)",
                TC_FLOOR_PROGRAM,
                vec![established.clone()],
            ),
            ("new flow", TC_INGRESS_PROGRAM, new_flows),
            (
                "established flow",
                TC_INGRESS_PROGRAM,
                vec![established.clone()],
            ),
            (
                "established, same port",
                TC_INGRESS_PROGRAM,
                vec![same_port],
            ),
            // Replies are translated on their way out to the client (TC egress of its link).
            ("reply", TC_EGRESS_PROGRAM, vec![reply]),
            ("non-service packet", TC_INGRESS_PROGRAM, other),
        ];
        for (case, program, frames) in &cases {
            let mut stats = Vec::new();
            let mut loops = Vec::new();
            for _ in 0..ROUNDS {
                if *case == "new flow" {
                    // Fresh conntrack each round, so every run really is a new flow.
                    t = rebuild(&frontends);
                }
                let runs = if *case == "new flow" { NEW_FLOWS } else { RUNS };
                let (s, l) = time(&mut t, program, frames, runs);
                stats.push(s);
                loops.push(l);
            }
            rows.push(Row {
                services,
                case,
                stats: median(stats),
                loop_: median(loops),
            });
        }
    }
    print_report(&rows);
    write_json(&rows);
}

/// target/bench/datapath.json for `cargo xtask bench --report`: ns above the floor (the floor
/// itself in absolute ns).
fn write_json(rows: &[Row]) {
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let floor = rows.iter().find(|f| f.services == r.services && f.case.starts_with("floor")).unwrap();
            let (stats, loop_) = if r.case.starts_with("floor") {
                (r.stats, r.loop_)
            } else {
                (r.stats - floor.stats, r.loop_ - floor.loop_)
            };
            serde_json::json!({"services": r.services, "case": r.case, "stats_ns": stats, "loop_ns": loop_})
        })
        .collect();
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    std::fs::write(
        out.join("datapath.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .expect("write datapath.json");
}

fn rebuild(frontends: &[(lb::desired::Frontend, Vec<SocketAddrV4>)]) -> TestDatapath {
    let mut t = TestDatapath::new();
    t.program(frontends);
    t
}

fn print_report(rows: &[Row]) {
    println!(
        "\nTC program, BPF_PROG_TEST_RUN, 54-byte TCP SYN, {RUNS} single runs x {ROUNDS} rounds, median; new flows: {NEW_FLOWS} distinct flows per round on an empty conntrack map"
    );
    println!("ns above the floor; the floor itself in absolute ns\n");
    println!(
        "{:<22} {:>10} {:>16} {:>16}",
        "case", "services", "stats (ns)", "loop (ns)"
    );
    for services in [1u32, 1_000, 100_000] {
        let floor = rows
            .iter()
            .find(|r| r.services == services && r.case.starts_with("floor"))
            .unwrap();
        for r in rows.iter().filter(|r| r.services == services) {
            let (s, l) = if r.case.starts_with("floor") {
                (format!("{:.1} abs", r.stats), format!("{:.1} abs", r.loop_))
            } else {
                (
                    format!("{:+.1}", r.stats - floor.stats),
                    format!("{:+.1}", r.loop_ - floor.loop_),
                )
            };
            println!("{:<24} {:>10} {:>16} {:>16}", r.case, services, s, l);
        }
    }
    let est = |n: u32| {
        let floor = rows
            .iter()
            .find(|r| r.services == n && r.case.starts_with("floor"))
            .unwrap()
            .stats;
        rows.iter()
            .find(|r| r.services == n && r.case == "established flow")
            .unwrap()
            .stats
            - floor
    };
    let (one, many) = (est(1), est(100_000));
    println!(
        "\nestablished flow above floor (stats): {one:.1} ns at 1 service, {many:.1} ns at 100,000 ({:+.0}%); target <= 40 ns, flat within 10%",
        (many - one) / one * 100.0
    );
}
