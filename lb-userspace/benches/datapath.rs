//! Per-packet cost of the TC programs with BPF_PROG_TEST_RUN, as ns above a program that only
//! returns and as a multiple of a reference program's cost (parse + one conntrack lookup),
//! with 1, 1,000 and 100,000 Services in the maps.
//!
//! With `repeat` > 1 the kernel reruns the program on the buffer it already rewrote (a DNAT
//! program would time its own output), so every figure comes from single runs (repeat = 1)
//! in a loop, read two ways: the kernel's per-program run-time statistics (run_time_ns /
//! run_cnt, BPF_ENABLE_STATS), and the duration BPF_PROG_TEST_RUN reports for each run.
//!
//! The cases take turns, a slice of runs each per round, so that a slow spell of the machine
//! falls on all of them; each figure is the median over the rounds. After every slice the
//! datapath's counters must show that each run took the path the case names.
//!
//! Backend selection is timed too: new and established flows to a Service with ClientIP
//! affinity, and on a datapath choosing by Maglev (tables of 251 entries, the smallest size,
//! so that 100,000 Services' tables fit in memory; a lookup costs the same in any size).
//!
//! The XDP program of external links is timed the same way, as ns above an XDP program that
//! only returns: established nodePort flows to a pod of this node (DNAT, XDP_PASS) and to
//! another node's (SNAT, the next hop its conntrack entry keeps, XDP_TX), and a packet it does
//! not own. The bench runs in a network namespace of its own whose routes and neighbours the
//! FIB lookups find.
//!
//! `LB_BENCH_CASE=<prefix>` times only the cases whose name starts with it (the floors and the
//! reference always run), e.g. under `perf record`.
#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use aya::programs::{TestRun, TestRunOptions};
use lb::{
    dataplane::{
        TC_EGRESS_PROGRAM, TC_FLOOR_PROGRAM, TC_INGRESS_PROGRAM, TC_REFERENCE_PROGRAM,
        XDP_FLOOR_PROGRAM, XDP_PROGRAM,
    },
    desired::{Algorithm, Backends, Frontend, Scope},
    model::Protocol,
};
use support::{
    datapath::{TestDatapath, tcp_frontend},
    packet::{TCP, ipv4_frame},
    uplink::{CLIENT, NODE, in_test_netns, xdp, xdp_md},
};
use xtask::machine::Machine;

const ROUNDS: usize = 15;
/// Runs of each case per round.
const RUNS: usize = 30_000;
/// New flows per round, each a 5-tuple not seen before, on a datapath with an empty
/// conntrack map (rebuilt every round): both entries of each fit in the LRU map, so no run
/// pays for eviction.
const NEW_FLOWS: usize = 30_000;
const SCALES: [u32; 3] = [1, 1_000, 100_000];
const FLOOR: &str = "floor (returns at once)";
const XDP_FLOOR: &str = "XDP floor (returns at once)";
/// The nodePorts of the XDP cases: to this node's pods, and to another node's.
const LOCAL_NODE_PORT: u16 = 30080;
const REMOTE_NODE_PORT: u16 = 30081;
const REFERENCE: &str = "reference (parse + one lookup)";
/// The target of the established path, as a multiple of the reference's cost.
const ESTABLISHED_TARGET: f64 = 1.5;

fn service_ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + 1 + i)
}

fn backend_addr(i: u32, j: u32) -> SocketAddrV4 {
    SocketAddrV4::new(
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 256 + 2 * i + j),
        8080,
    )
}

/// Which datapath a case runs on.
#[derive(Clone, Copy, PartialEq)]
enum On {
    /// Programmed once; the measured flows are in its conntrack map.
    Steady,
    /// Rebuilt before every round, so that every run is a new flow.
    Fresh,
    /// The same two, choosing backends by Maglev.
    MaglevSteady,
    MaglevFresh,
}

impl On {
    fn fresh(self) -> bool {
        matches!(self, On::Fresh | On::MaglevFresh)
    }

    fn algorithm(self) -> Algorithm {
        match self {
            On::Steady | On::Fresh => Algorithm::Random,
            On::MaglevSteady | On::MaglevFresh => Algorithm::Maglev {
                table_size: lb_common::maglev::MIN_TABLE_SIZE,
            },
        }
    }
}

struct Case {
    name: &'static str,
    program: &'static str,
    frames: Vec<Vec<u8>>,
    on: On,
    /// The counter every run must add one to (none for the floor and the reference).
    counter: Option<&'static str>,
}

/// ns per run of `frames` (cycled) through a loaded program, by kernel stats and by test-run
/// duration; `ctx` gives each frame's context (XDP), if any.
macro_rules! timed {
    ($prog:expr, $frames:expr, $runs:expr, $ctx:expr) => {{
        let prog = $prog;
        let frames: &[Vec<u8>] = $frames;
        let contexts: Vec<Option<Vec<u8>>> = frames.iter().map(|f| $ctx(f)).collect();
        let before = prog.info().expect("info");
        let mut out = vec![0u8; 256];
        let mut reported = Duration::ZERO;
        for i in 0..$runs {
            let opts = TestRunOptions {
                data_in: Some(&frames[i % frames.len()]),
                data_out: Some(&mut out),
                ctx_in: contexts[i % frames.len()].as_deref(),
                ..Default::default()
            };
            reported += prog.test_run(opts).expect("test run").duration;
        }
        let after = prog.info().expect("info");
        let kernel_runs = (after.run_count() - before.run_count()) as f64;
        let stats = (after.run_time() - before.run_time()).as_nanos() as f64 / kernel_runs;
        (stats, reported.as_nanos() as f64 / $runs as f64)
    }};
}

/// ns per run of `frames` (cycled) through `program`, by kernel stats and by test-run duration.
/// XDP programs run as if the frame arrived on `uplink`.
fn time(
    t: &mut TestDatapath,
    program: &'static str,
    frames: &[Vec<u8>],
    runs: usize,
    uplink: u32,
) -> (f64, f64) {
    if program.starts_with("lb_xdp") {
        let prog = t.dp.xdp_program(program).expect("program");
        return timed!(prog, frames, runs, |f: &Vec<u8>| Some(xdp_md(f, uplink)));
    }
    let prog = t.dp.classifier(program).expect("program");
    timed!(prog, frames, runs, |_: &Vec<u8>| None)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Row {
    services: u32,
    case: &'static str,
    /// Absolute ns per run, median over the rounds.
    stats: f64,
    loop_: f64,
}

fn main() {
    in_test_netns(run);
}

fn run(uplink: u32) {
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF_ENABLE_STATS");
    let only_case = std::env::var("LB_BENCH_CASE").ok();
    let mut rows = Vec::new();
    for services in SCALES {
        let mut frontends: Vec<_> = (0..services)
            .map(|i| {
                (
                    tcp_frontend(service_ip(i), 80),
                    Backends::serving(vec![backend_addr(i, 0), backend_addr(i, 1)]),
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
        // The same backends once more, behind a Service with ClientIP affinity.
        let affinity_vip = service_ip(services + 2);
        frontends.push((
            tcp_frontend(affinity_vip, 80),
            Backends {
                affinity_timeout_s: Some(lb_common::affinity::DEFAULT_TIMEOUT_S),
                ..frontends[(services / 2) as usize].1.clone()
            },
        ));
        // nodePorts, for the XDP cases: to this node's pods, and to another node's.
        for (port, backend) in [
            (LOCAL_NODE_PORT, Ipv4Addr::new(198, 18, 2, 1)),
            (REMOTE_NODE_PORT, Ipv4Addr::new(198, 18, 3, 1)),
        ] {
            let frontend = Frontend {
                ip: Ipv4Addr::UNSPECIFIED,
                port,
                protocol: Protocol::Tcp,
                scope: Scope::Cluster,
            };
            frontends.push((
                frontend,
                Backends::serving(vec![SocketAddrV4::new(backend, 8080)]),
            ));
        }
        let mut steady = rebuild(&frontends, On::Steady);
        let mut maglev_steady = rebuild(&frontends, On::MaglevSteady);
        // The measured Service: one in the middle of the table.
        let vip = service_ip(services / 2);
        let client = Ipv4Addr::new(198, 18, 255, 1);
        // ACK segments: what an established connection carries.
        let established = tcp_segment((client, 10000), (vip, 80));
        let backend = support::packet::dst(&steady.run(&established).frame);
        let reply = tcp_segment(backend, (client, 10000));
        let same_port = tcp_segment((client, 10001), (same_port_vip, 8080));
        steady.run(&same_port);
        let other = tcp_segment((client, 10000), (Ipv4Addr::new(198, 18, 254, 254), 80));
        let new_flows_to = |vip: Ipv4Addr| -> Vec<Vec<u8>> {
            (0..NEW_FLOWS as u32)
                .map(|i| {
                    let src = Ipv4Addr::new(198, 18, 200 + (i / 60_000) as u8, 1);
                    ipv4_frame(TCP, (src, 1024 + (i % 60_000) as u16), (vip, 80), b"")
                })
                .collect()
        };
        let new_flows = new_flows_to(vip);
        // Every flow from a client of its own: each run misses the affinity map and adds to it.
        let new_clients: Vec<Vec<u8>> = (0..NEW_FLOWS as u32)
            .map(|i| {
                let src = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 128, 0)) + i);
                ipv4_frame(TCP, (src, 40_000), (affinity_vip, 80), b"")
            })
            .collect();
        let affinity_established = tcp_segment((client, 10002), (affinity_vip, 80));
        steady.run(&affinity_established);
        maglev_steady.run(&established);
        let node_port_local = tcp_segment((CLIENT, 20000), (NODE, LOCAL_NODE_PORT));
        let node_port_remote = tcp_segment((CLIENT, 20001), (NODE, REMOTE_NODE_PORT));
        for frame in [&node_port_local, &node_port_remote] {
            xdp(&mut steady, uplink, frame);
        }
        let not_owned = tcp_segment((CLIENT, 20002), (NODE, 22));
        let cases = [
            Case {
                name: XDP_FLOOR,
                program: XDP_FLOOR_PROGRAM,
                frames: vec![node_port_local.clone()],
                on: On::Steady,
                counter: None,
            },
            Case {
                name: "XDP established nodePort, local pod",
                program: XDP_PROGRAM,
                frames: vec![node_port_local],
                on: On::Steady,
                counter: Some("dnat_established"),
            },
            Case {
                name: "XDP established nodePort, other node",
                program: XDP_PROGRAM,
                frames: vec![node_port_remote],
                on: On::Steady,
                counter: Some("dnat_established"),
            },
            Case {
                name: "XDP packet it does not own",
                program: XDP_PROGRAM,
                frames: vec![not_owned],
                on: On::Steady,
                counter: None,
            },
            Case {
                name: FLOOR,
                program: TC_FLOOR_PROGRAM,
                frames: vec![established.clone()],
                on: On::Steady,
                counter: None,
            },
            Case {
                name: REFERENCE,
                program: TC_REFERENCE_PROGRAM,
                frames: vec![established.clone()],
                on: On::Steady,
                counter: None,
            },
            Case {
                name: "new flow",
                program: TC_INGRESS_PROGRAM,
                frames: new_flows.clone(),
                on: On::Fresh,
                counter: Some("dnat_new"),
            },
            Case {
                name: "established flow",
                program: TC_INGRESS_PROGRAM,
                frames: vec![established.clone()],
                on: On::Steady,
                counter: Some("dnat_established"),
            },
            // One client's new flows: each finds the client's entry and refreshes it.
            Case {
                name: "new flow, affinity, known client",
                program: TC_INGRESS_PROGRAM,
                frames: new_flows_to(affinity_vip),
                on: On::Fresh,
                counter: Some("dnat_new"),
            },
            Case {
                name: "new flow, affinity, new client",
                program: TC_INGRESS_PROGRAM,
                frames: new_clients,
                on: On::Fresh,
                counter: Some("dnat_new"),
            },
            Case {
                name: "established flow, affinity",
                program: TC_INGRESS_PROGRAM,
                frames: vec![affinity_established],
                on: On::Steady,
                counter: Some("dnat_established"),
            },
            Case {
                name: "new flow, maglev",
                program: TC_INGRESS_PROGRAM,
                frames: new_flows,
                on: On::MaglevFresh,
                counter: Some("dnat_new"),
            },
            Case {
                name: "established flow, maglev",
                program: TC_INGRESS_PROGRAM,
                frames: vec![established.clone()],
                on: On::MaglevSteady,
                counter: Some("dnat_established"),
            },
            Case {
                name: "established, same port",
                program: TC_INGRESS_PROGRAM,
                frames: vec![same_port],
                on: On::Steady,
                counter: Some("dnat_established"),
            },
            // Replies are translated on their way out to the client (TC egress of its link).
            Case {
                name: "reply",
                program: TC_EGRESS_PROGRAM,
                frames: vec![reply],
                on: On::Steady,
                counter: Some("reverse_nat"),
            },
            Case {
                name: "non-service packet",
                program: TC_INGRESS_PROGRAM,
                frames: vec![other],
                on: On::Steady,
                counter: Some("pass_no_service"),
            },
        ];
        let cases: Vec<Case> = cases
            .into_iter()
            .filter(|c| {
                c.name == FLOOR
                    || c.name == XDP_FLOOR
                    || c.name == REFERENCE
                    || only_case.as_deref().is_none_or(|p| c.name.starts_with(p))
            })
            .collect();
        let mut samples: Vec<(Vec<f64>, Vec<f64>)> = vec![Default::default(); cases.len()];
        let mut fresh = None;
        for _ in 0..ROUNDS {
            for (case, (stats, loops)) in cases.iter().zip(samples.iter_mut()) {
                let t = match case.on {
                    On::Steady => &mut steady,
                    On::MaglevSteady => &mut maglev_steady,
                    On::Fresh | On::MaglevFresh => {
                        // The last one goes first: two datapaths of 100,000 Services at once
                        // would only cost memory.
                        drop(fresh.take());
                        fresh.insert(rebuild(&frontends, case.on))
                    }
                };
                let before = case.counter.map(|c| t.counter(c));
                let runs = if case.on.fresh() { NEW_FLOWS } else { RUNS };
                let (s, l) = time(t, case.program, &case.frames, runs, uplink);
                if let (Some(name), Some(before)) = (case.counter, before) {
                    let counted = t.counter(name) - before;
                    assert_eq!(
                        counted, runs as u64,
                        "{}: {counted} of {runs} runs counted as {name}",
                        case.name
                    );
                }
                stats.push(s);
                loops.push(l);
            }
        }
        for (case, (stats, loops)) in cases.iter().zip(samples) {
            rows.push(Row {
                services,
                case: case.name,
                stats: median(stats),
                loop_: median(loops),
            });
        }
    }
    let machine = Machine::read();
    print_report(&rows, &machine);
    write_json(&rows, &machine);
}

fn tcp_segment(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16)) -> Vec<u8> {
    support::packet::tcp_with_flags(src, dst, 0x10)
}

fn rebuild(frontends: &[(Frontend, Backends)], on: On) -> TestDatapath {
    let mut t = TestDatapath::new();
    t.algorithm = on.algorithm();
    t.dp.set_node_addresses(&[NODE]).unwrap();
    t.program_backends(frontends);
    t
}

/// Cost above the floor (the XDP floor for XDP cases), and as a multiple of the reference's
/// cost above the floor.
fn relative(rows: &[Row], r: &Row) -> (f64, f64, f64) {
    let find = |case: &str| {
        rows.iter()
            .find(|x| x.services == r.services && x.case == case)
    };
    let floor = if r.case.starts_with("XDP") {
        find(XDP_FLOOR).expect("XDP floor row")
    } else {
        find(FLOOR).expect("floor row")
    };
    let reference_floor = find(FLOOR).expect("floor row");
    let reference = find(REFERENCE).expect("reference row");
    let above = r.stats - floor.stats;
    let loop_above = r.loop_ - floor.loop_;
    (
        above,
        loop_above,
        above / (reference.stats - reference_floor.stats),
    )
}

/// target/bench/datapath.json for `cargo xtask bench --report`: ns above the floor (the floor
/// itself in absolute ns) and multiples of the reference.
fn write_json(rows: &[Row], machine: &Machine) {
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let (stats, loop_, times) = if r.case == FLOOR || r.case == XDP_FLOOR {
                (r.stats, r.loop_, 0.0)
            } else {
                relative(rows, r)
            };
            serde_json::json!({"services": r.services, "case": r.case, "stats_ns": stats,
                "loop_ns": loop_, "x_reference": times})
        })
        .collect();
    let json = serde_json::json!({"machine": machine, "rows": json});
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&out).expect("target/bench");
    std::fs::write(
        out.join("datapath.json"),
        serde_json::to_string_pretty(&json).unwrap(),
    )
    .expect("write datapath.json");
}

fn print_report(rows: &[Row], machine: &Machine) {
    println!(
        "\nTC programs, BPF_PROG_TEST_RUN, 54-byte TCP segments, {ROUNDS} rounds of {RUNS} single runs per case, cases taking turns, median"
    );
    println!("{}", machine.describe());
    println!("ns above the floor (the floor itself in absolute ns) and x the reference's cost\n");
    println!(
        "{:<32} {:>8} {:>12} {:>12} {:>12}",
        "case", "services", "stats (ns)", "loop (ns)", "x reference"
    );
    for r in rows {
        if r.case == FLOOR || r.case == XDP_FLOOR {
            println!(
                "{:<32} {:>8} {:>12} {:>12} {:>12}",
                r.case,
                r.services,
                format!("{:.1} abs", r.stats),
                format!("{:.1} abs", r.loop_),
                ""
            );
        } else {
            let (above, loop_above, times) = relative(rows, r);
            println!(
                "{:<32} {:>8} {:>12} {:>12} {:>12}",
                r.case,
                r.services,
                format!("{above:+.1}"),
                format!("{loop_above:+.1}"),
                format!("{times:.2}x")
            );
        }
    }
    let established: Vec<_> = rows
        .iter()
        .filter(|r| r.case == "established flow")
        .map(|r| (r.services, relative(rows, r)))
        .collect();
    if let (Some(first), Some(last)) = (established.first(), established.last()) {
        println!(
            "\nestablished flow: {:.2}x the reference at {} Services, {:.2}x at {} (target <= {ESTABLISHED_TARGET}x); {:.1} ns and {:.1} ns above the floor",
            first.1.2, first.0, last.1.2, last.0, first.1.0, last.1.0
        );
    }
}
